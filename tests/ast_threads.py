"""``ast.parse`` one thread at a time, in the test process, on CPython releases that need it.

Before 3.11.8, CPython counted the AST constructor's recursion depth in state shared by every
thread (python/cpython#106905, fixed by gh-113035). A garbage collection in the middle of one
thread's ``ast.parse`` can let another thread's ``ast.parse`` run and move that count, and the
first then fails with "SystemError: AST constructor recursion depth mismatch". The suite
parses in several threads at once: pytest rewrites modules as they are imported, Hypothesis
parses lambdas to describe strategies, and a traceback formatted in any thread (paho's, the
Cassandra driver's, a store's writer) parses its lines to place its carets.

This covers threads only (tests/test_ast_threads.py). The HTTP fuzz test still failed once with
the same SystemError with this lock in place (a fresh-clone run on Debian's 3.11.2, inside
Hypothesis describing a lambda): another way in, perhaps a parse started again in the same
thread by a garbage collection, is not covered yet.
"""

from __future__ import annotations

import ast
import functools
import sys
import threading
from typing import Any

FIXED_IN = (3, 11, 8)


def serialize_ast_parse() -> bool:
    """Make ``ast.parse`` take a process-wide lock (re-entrant: a collection in the middle of one
    may parse again in the same thread); True when this CPython needed it."""
    if sys.version_info >= FIXED_IN or getattr(ast.parse, "_one_thread_at_a_time", False):
        return False
    parse = ast.parse
    lock = threading.RLock()

    @functools.wraps(parse)
    def one_at_a_time(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return parse(*args, **kwargs)

    one_at_a_time._one_thread_at_a_time = True  # type: ignore[attr-defined]
    ast.parse = one_at_a_time
    return True
