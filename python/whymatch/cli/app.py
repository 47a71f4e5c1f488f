"""The `whymatch` parser and its main(): every failure one line on stderr, exit status 2 (Ctrl-C: 130)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .._checks import first_line as _first_line, printable as _printable
from .._version import __version__


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: ``whymatch <command>: error: ...`` (exit code 2)."""

    def error(self, message: str):
        msg = _printable(message.replace("\n", " "))
        msg = msg if len(msg) <= 500 else msg[:497] + "..."  # a pasted megabyte of digits stays one short line
        self.exit(2, f"{self.prog}: error: {msg} (see {_printable(self.prog)} --help)\n")


_DEBUG_HINT = "(set WHYMATCH_DEBUG=1 for the traceback)"


def _error_message(exc: BaseException) -> str:
    """One line for an exception that ended a command: the message of the errors whymatch raises on purpose
    (named paths and options), the kind and message of the others."""
    from PIL import Image

    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, ImportError)) and not isinstance(exc, UnicodeError):
        return _first_line(exc)
    if isinstance(exc, MemoryError):
        return ("out of memory" + (f" ({_first_line(exc)})" if str(exc) else "") +
                ": use fewer or smaller images, masks or samples (--size, --batch-size, --n-masks, ...)")
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            where = f"{exc.filename!s}" + (f" -> {exc.filename2!s}" if exc.filename2 is not None else "")
            return f"{exc.strerror}: {where}"
        return f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, Image.DecompressionBombError):
        return _first_line(exc)
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and (type(exc).__name__ == "OutOfMemoryError" or any(
            k in text for k in ("out of memory", "can't allocate memory", "cannot allocate memory"))):
        return (f"out of memory ({type(exc).__name__}: {_first_line(exc)}): use fewer or smaller images, masks "
                f"or samples")
    return f"{type(exc).__name__}: {_first_line(exc)} {_DEBUG_HINT}"


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed heap memory for the whole run instead of returning every large block to the kernel
    (:func:`whymatch.memory.keep_freed_memory`): `whymatch demo` spent 17 s of system time without it (20 s wall
    with it against 32 s without, on 2 idle cores, 2026-12-03). Returns whether it applied."""
    from ..memory import keep_freed_memory as keep

    return keep()


def _add_command(sub, module, options: bool) -> argparse.ArgumentParser:
    """Add the subcommand ``module.NAME`` (help ``module.HELP``) running ``cmd_<module>``; its options
    (``module.add_options``) only with ``options``."""
    parser = sub.add_parser(module.NAME, help=module.HELP)
    parser.set_defaults(_parser=parser, func=getattr(module, "cmd_" + module.__name__.rpartition(".")[2]))
    if options:
        module.add_options(parser)
    return parser


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `whymatch` parser: one subcommand per module of this package (``train``: one per task).

    With the command line ``argv``, only the command it runs gets its options (some come from config classes and
    the explainer registry, whose modules would otherwise be imported for nothing); without it, every command
    gets them.
    """
    from . import demo, explain, explain_avsl, info, search_explain, train

    p = _Parser(prog="whymatch", description="Explain why an image similarity model matched two images.")
    p.add_argument("--version", action="version", version=f"whymatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # the command and the train task: the first two words that are not options (no option takes a value before them)
    words = [a for a in argv if not a.startswith("-")][:2] if argv is not None else []
    for module in (info, demo, explain, search_explain, explain_avsl):
        _add_command(sub, module, options=argv is None or words[:1] == [module.NAME])
    group = sub.add_parser(train.NAME, help=train.HELP)
    tasks = group.add_subparsers(dest="task", required=True)
    for module in train.TASKS:
        _add_command(tasks, module, options=argv is None or words == [train.NAME, module.NAME])
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``whymatch`` command; returns the exit status.

    Every failure is one line ``whymatch <command>: error: ...`` on stderr and status 2 (Ctrl-C: 130), also for
    argparse's usage errors; no traceback unless the environment sets WHYMATCH_DEBUG=1. Warnings are one line
    each (``whymatch <command>: warning: ...``): live during training, after the result otherwise, and not at
    all when the command fails, whose stderr is then its error line alone.
    """
    import warnings

    debug = os.environ.get("WHYMATCH_DEBUG", "").strip() not in ("", "0")
    keep_freed_memory()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    prog, held = parser.prog, []

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{prog}: warning: {category.__name__}: {_first_line(Warning(str(message)))}"
        if live:
            print(text, file=sys.stderr)
        else:
            held.append(text)

    live = True
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            try:
                args, extra = parser.parse_known_args(argv)
                if extra:
                    getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
            except SystemExit as exc:  # usage errors (2), --help and --version (0)
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            prog = getattr(args, "_parser", parser).prog
            live = debug or args.command == "train"  # hours of training: say it when it happens
            status = args.func(args)
        for text in held:
            print(text, file=sys.stderr)
        return status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed by the reader (e.g. `| head`): stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except Exception as exc:  # noqa: BLE001 (the last resort: one line, never a traceback)
        if debug:
            raise
        print(f"{prog}: error: {_printable(_error_message(exc).replace(chr(10), ' '))}", file=sys.stderr)
        return 2
