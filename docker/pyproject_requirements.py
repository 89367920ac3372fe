"""Print requirement lines from ``pyproject.toml``: the images' only source of dependencies.

The Dockerfiles install in three cached layers, all read from the same ``pyproject.toml`` the
README's ``pip install -e ".[dev]"`` reads: (1) ``--torch``: torch and torchvision, installed from
the PyTorch wheel index of the image's flavour (CPU or CUDA); (2) the other runtime dependencies
plus any ``--extra``; (3) ``pip install ".[extra]"`` of the project itself, which then finds
everything already installed. ``--extras-only`` prints just the extras (the Locust image).

Usage: ``python pyproject_requirements.py pyproject.toml [--torch | [--extra NAME]... [--extras-only]]``
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

TORCH = frozenset({"torch", "torchvision"})
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[([^\]]*)\])?")


def requirement_name(req: str) -> str:
    """Normalised distribution name of a PEP 508 requirement string (PEP 503 normalisation)."""
    match = _NAME.match(req)
    if not match:
        raise ValueError(f"not a requirement: {req!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def extra_requirements(project: dict, extra: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """Requirements of ``extra``, with self-references such as ``gnws[train]`` expanded."""
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise KeyError(f"pyproject.toml has no extra {extra!r}; it has {sorted(extras)}")
    self_name = requirement_name(project["name"])
    out: list[str] = []
    for req in extras[extra]:
        match = _NAME.match(req)
        if match and requirement_name(req) == self_name:
            for inner in (match.group(3) or "").split(","):
                if inner.strip() and inner.strip() not in seen:
                    out.extend(extra_requirements(project, inner.strip(), seen | {extra}))
        else:
            out.append(req)
    return out


def requirements(pyproject: Path, *, torch: bool = False, extras: list[str] | None = None,
                 extras_only: bool = False) -> list[str]:
    """The requirement lines the arguments select, in pyproject order, without duplicates."""
    project = tomllib.loads(pyproject.read_text())["project"]
    core = list(project.get("dependencies", []))
    if torch:
        return [r for r in core if requirement_name(r) in TORCH]
    selected = [] if extras_only else [r for r in core if requirement_name(r) not in TORCH]
    for extra in extras or []:
        selected.extend(extra_requirements(project, extra))
    return list(dict.fromkeys(selected))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--torch", action="store_true", help="only torch and torchvision")
    parser.add_argument("--extra", action="append", default=[], help="add an optional-dependencies group")
    parser.add_argument("--extras-only", action="store_true", help="only the --extra groups")
    args = parser.parse_args(argv)
    if args.torch and (args.extra or args.extras_only):
        parser.error("--torch cannot be combined with --extra/--extras-only")
    lines = requirements(args.pyproject, torch=args.torch, extras=args.extra, extras_only=args.extras_only)
    if not lines:
        parser.error("selected no requirements")
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
