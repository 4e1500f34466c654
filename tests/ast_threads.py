"""``ast.parse`` one thread at a time, in the test process, on CPython releases that need it.

Before 3.11.8, CPython counted the AST constructor's recursion depth in state shared by every
thread (python/cpython#106905, fixed by gh-113035). A garbage collection in the middle of one
thread's ``ast.parse`` can let another thread's ``ast.parse`` run and move that count, and the
first then fails with "SystemError: AST constructor recursion depth mismatch". The suite
parses in several threads at once: pytest rewrites modules as they are imported, Hypothesis
parses lambdas to describe strategies, and a traceback formatted in any thread (paho's, the
Cassandra driver's, a store's writer) parses its lines to place its carets.

The same thread can do it too: a collection in the middle of a parse runs finalizers, one that
raises goes to pytest's unraisable-exception hook, and that formats a traceback, which parses
again before the first parse is done (this failed the HTTP fuzz test on Debian's 3.11.2 with
only the lock in place). So the parse also runs with the collector off; a parse allocates
nothing the collector is needed for, and the collector is back on as soon as it returns.
"""

from __future__ import annotations

import ast
import functools
import gc
import sys
import threading
from typing import Any

FIXED_IN = (3, 11, 8)


def serialize_ast_parse() -> bool:
    """Make ``ast.parse`` take a process-wide lock and run with the garbage collector off, so no
    other parse can start in the middle of one, in another thread or in this one; True when this
    CPython needed it."""
    if sys.version_info >= FIXED_IN or getattr(ast.parse, "_one_thread_at_a_time", False):
        return False
    parse = ast.parse
    lock = threading.RLock()  # re-entrant, should a parse ever start another one on its own

    @functools.wraps(parse)
    def one_at_a_time(*args: Any, **kwargs: Any) -> Any:
        with lock:
            collecting = gc.isenabled()
            gc.disable()
            try:
                return parse(*args, **kwargs)
            finally:
                if collecting:
                    gc.enable()

    one_at_a_time._one_thread_at_a_time = True  # type: ignore[attr-defined]
    ast.parse = one_at_a_time
    return True
