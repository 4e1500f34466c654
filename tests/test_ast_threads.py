"""Threads parsing at once, with collections that run Python code in the middle of a parse
(python/cpython#106905's reproduction, bounded): no "recursion depth mismatch" in this run.
On CPython before 3.11.8 it failed at once without tests/ast_threads.py's lock."""

from __future__ import annotations

import ast
import difflib
import gc
import random
import threading
from pathlib import Path
from typing import Any


def test_threads_parse_at_once_without_a_recursion_depth_mismatch() -> None:
    source = (Path(__file__).parent.parent / "bridge" / "wire_v2.py").read_text()
    rng = random.Random(7)

    def busy_collection(_phase: str, _info: dict[str, Any]) -> None:
        lines = [[f"{rng.randint(0, 10)}\n" for _ in range(50)] for _ in range(2)]
        list(difflib.unified_diff(*lines))

    failures: list[BaseException] = []

    def parse() -> None:
        try:
            for _ in range(5):
                ast.parse(source, "wire_v2.py")
        except SystemError as exc:
            failures.append(exc)

    gc.callbacks.append(busy_collection)
    try:
        threads = [threading.Thread(target=parse) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        gc.callbacks.remove(busy_collection)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
