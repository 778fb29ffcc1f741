"""Command line ``bnref-onnx`` (also ``python -m onnx_tools``): a thin layer over the API.

Exit status: 0 success, 1 a user-facing error (one line ``bnref-onnx: error: ...``, no
traceback unless ``--debug``; nothing written, the input untouched), 2 a usage error, 130 on
Ctrl-C and 143 on SIGTERM (no partial file either).

:mod:`~onnx_tools.cli.parser` holds the options, :mod:`~onnx_tools.cli.commands` what each
subcommand does; this module runs one: logging, signals and the exit status.
"""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from onnx_tools.cli.parser import PROG, build_parser
from onnx_tools.errors import BnrefOnnxError, Interrupted
from onnx_tools.interrupts import interrupt
from onnx_tools.options import cli_interface

__all__ = ["PROG", "build_parser", "main"]

logger = logging.getLogger("onnx_tools")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        return f"{PROG}: {level}: {record.getMessage()}"


def _raise_interrupted(signum: int, frame) -> None:
    interrupt(signum)  # raises now, or right after a write's final renames


def _signal_name(signum: int) -> str:
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def _parse(argv: Sequence[str] | None):
    """Parse; an unknown option is reported with its subcommand's usage and a suggestion."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = args.subparser
        known = [o for a in sub._actions for o in a.option_strings]
        hints = [m for e in extra if e.startswith("-")
                 for m in difflib.get_close_matches(e.split("=")[0], known, n=1)]
        hint = f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _quiet_stdout() -> None:
    """After stdout failed, point it at /dev/null so the exit flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _run(args) -> int:
    from onnx_tools.cli.commands import COMMANDS, StdoutError  # heavy imports, after the handlers

    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `bnref-onnx inspect m.onnx | head -1`: exit quietly, like cat
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except StdoutError:
        _quiet_stdout()  # else the exit's flush of what is left fails once more
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread
            pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    args = None
    try:
        args = _parse(argv)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
        logger.propagate = False
        with cli_interface():  # messages name flags (--keep-partial), not API arguments
            return _run(args)
    except Interrupted as exc:
        print(f"{PROG}: interrupted by {_signal_name(exc.signum)}; no partial output left",
              file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted by {_signal_name(signal.SIGINT)}; no partial output left",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except BnrefOnnxError as exc:
        if args is not None and args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        logger.removeHandler(handler)
