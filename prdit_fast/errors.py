"""The two kinds of expected failure, as the ``prdit-fast`` command reports them.

``UsageError``: a command-line argument or config value is wrong (the message names
it); the command prints one ``error:`` line and exits with status 2. Any other
exception a command raises is a runtime failure: one ``error:`` line, status 1. The
traceback is shown only with ``prdit-fast --debug``.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A bad command-line argument or config value; the message names it."""
