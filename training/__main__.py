"""``python -m training train|eval|export ...``: the entry point for torchrun (one process per GPU).

Example: ``torchrun --nproc-per-node 8 -m training train --model NAME --data ROOT``. Logging is
configured here: INFO on rank 0, warnings only on the other ranks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from models.allocator import tune_malloc
from models.errors import GnwsError

from .cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = (logging.DEBUG if args.verbose else logging.INFO) if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s", stream=sys.stderr
    )
    tune_malloc()  # before any thread starts: forward passes reuse freed memory (models/allocator.py)
    try:
        return int(args.func(args) or 0)
    except GnwsError as exc:
        sys.stderr.write(f"training {args.command}: error: {exc}\n")
        return 2
    except OSError as exc:  # files and folders the user named: missing, unwritable, full disk, ...
        detail = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        sys.stderr.write(f"training {args.command}: error: {detail}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
