"""SIGINT/SIGTERM as :class:`~onnx_tools.errors.Interrupted`, held inside critical sections.

The CLI installs a handler that calls :func:`interrupt`; it raises at once, except while a
write is between renames that must land together (:func:`signals_held`), where the signal is
delivered as soon as the section ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from onnx_tools.errors import Interrupted

_hold_depth = 0
_pending_signal: int | None = None


def interrupt(signum: int) -> None:
    """Raise :class:`Interrupted` now, or, inside a critical section, as soon as it ends."""
    global _pending_signal
    if _hold_depth:
        _pending_signal = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A critical section: an ``interrupt`` arriving inside it is delivered on leaving it."""
    global _hold_depth, _pending_signal
    _hold_depth += 1
    try:
        yield
    finally:
        _hold_depth -= 1
        if not _hold_depth and _pending_signal is not None:
            signum, _pending_signal = _pending_signal, None
            raise Interrupted(signum)
