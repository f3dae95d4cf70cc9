"""What the Triton ops share: whether Triton is importable, the interpreter switch and
autotune configs. Which implementation runs is decided in ``dispatch``."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on the CPU (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(tuned: list, interpreted: list) -> list:
    """Configs for ``triton.autotune``: ``interpreted`` under the interpreter (which pays
    per operation, so few large programs), the first of ``tuned`` when PRDIT_AUTOTUNE=0
    (tests on a GPU: correctness needs no tuning, and tuning costs minutes of compiles),
    else all of ``tuned``."""
    if interpreter_enabled():
        return interpreted
    if os.environ.get("PRDIT_AUTOTUNE", "1") == "0":
        return tuned[:1]
    return tuned
