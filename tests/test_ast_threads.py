"""Parses started in the middle of another (python/cpython#106905), from other threads and from
the same thread, bounded: no "recursion depth mismatch" in this run. On CPython before 3.11.8
each failed at once without tests/ast_threads.py's guard (the same-thread one with the lock
alone too)."""

from __future__ import annotations

import ast
import difflib
import gc
import random
import sys
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


class _RaisesWhenCollected:
    """Lives in a reference cycle, so only a collection frees it, and its finalizer raises."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        raise RuntimeError("raised while being collected")


def test_a_parse_started_by_a_collection_in_the_middle_of_one_does_not_break_it() -> None:
    # pytest's unraisable-exception hook formats the traceback, and placing its carets parses
    source = (Path(__file__).parent.parent / "bridge" / "wire_v2.py").read_text()
    failures: list[BaseException] = []
    hook, threshold = sys.unraisablehook, gc.get_threshold()
    sys.unraisablehook = lambda _unraisable: ast.parse("x = (1 + 2) * f(y[3])")
    gc.set_threshold(50)
    try:
        for _ in range(50):
            for _ in range(20):
                _RaisesWhenCollected()
            try:
                ast.parse(source, "wire_v2.py")
            except SystemError as exc:
                failures.append(exc)
    finally:
        gc.set_threshold(*threshold)
        gc.collect()  # the last of them, while their errors still go to the quiet hook
        sys.unraisablehook = hook
    assert failures == []
