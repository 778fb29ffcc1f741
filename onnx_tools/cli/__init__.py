"""Command line ``bnref-onnx`` (also ``python -m onnx_tools``): a thin layer over the API.

Exit status: 0 success, 1 a user-facing error (one line ``bnref-onnx: error: ...``, no
traceback unless ``--debug``; nothing written, the input untouched), 2 a usage error, 130 on
Ctrl-C and 143 on SIGTERM (no partial file either).

:mod:`~onnx_tools.cli.parser` holds the options, :mod:`~onnx_tools.cli.commands` what each
subcommand does; this module runs one: logging, signals and the exit status.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from collections.abc import Sequence

from onnx_tools.cli.commands import COMMANDS
from onnx_tools.cli.parser import PROG, build_parser
from onnx_tools.errors import BnrefOnnxError, Interrupted
from onnx_tools.interrupts import interrupt

__all__ = ["PROG", "build_parser", "main"]

logger = logging.getLogger("onnx_tools")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        return f"{PROG}: {level}: {record.getMessage()}"


def _raise_interrupted(signum: int, frame) -> None:
    interrupt(signum)  # raises now, or right after a write's final renames


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread
            pass
    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        print(f"{PROG}: interrupted (signal {exc.signum}); no partial output left", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial output left", file=sys.stderr)
        return 130
    except BnrefOnnxError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        logger.removeHandler(handler)

