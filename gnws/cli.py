"""The ``gnws`` command: one entry point dispatching to models, service and training commands.

Domain errors (:class:`models.errors.GnwsError`, unknown zoo names included) and errors of the
files the user named (``OSError``) are printed as one sentence on stderr with exit status 2; no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from models.allocator import tune_malloc
from models.errors import GnwsError


def build_parser() -> argparse.ArgumentParser:
    from loadtest import cli as loadtest_cli
    from models import cli as models_cli
    from service import cli as service_cli
    from training import cli as training_cli

    from .torchserve import archive

    parser = argparse.ArgumentParser(
        prog="gnws",
        description="Serve and refresh GN+WS (Group Norm + Weight Standardization) Faster/Mask R-CNN detectors.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (models_cli, service_cli, training_cli, archive, loadtest_cli):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tune_malloc()  # before any thread starts: forward passes reuse freed memory (models/allocator.py)
    try:
        return int(args.func(args) or 0)
    except GnwsError as exc:
        print(f"gnws {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # files and folders the user named: missing, unwritable, full disk, ...
        print(f"gnws {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
