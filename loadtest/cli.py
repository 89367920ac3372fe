"""``gnws loadtest --url URL``: bounded headless Locust run with a summary (see :mod:`loadtest.runner`)."""

from __future__ import annotations

import argparse
import sys

from .runner import LoadTestError, add_arguments, render_markdown, run


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="load-test a running gnws service with Locust (bounded, headless)")
    add_arguments(p)
    p.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args: argparse.Namespace) -> int:
    try:
        summary = run(args)
    except LoadTestError as exc:
        print(f"gnws loadtest: error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(summary))
    print(f"reports in {args.out}/ (summary.md, summary.json, gnws_stats.csv, gnws.html)")
    return 0
