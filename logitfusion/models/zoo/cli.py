"""Plain entry points for `logitfusion zoo build` and `logitfusion zoo merge` (wired by logitfusion/cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def _resolve_model(ref: str, cache_dir: str | None) -> Path:
    """A model directory, or "zoo:<name>" for a model of the zoo (e.g. zoo:small, zoo:expert_capital)."""
    if ref.startswith("zoo:"):
        from logitfusion.models.zoo.build import load_zoo

        return load_zoo(cache_dir).model(ref[len("zoo:") :])
    return Path(ref)


def build_main(args: Any) -> int:
    """Build the zoo. ``args``: ``force`` (bool), ``cache_dir`` (str or None), optional ``workers`` (int)."""
    from logitfusion.models.zoo.build import build

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    paths = build(
        cache_dir=getattr(args, "cache_dir", None),
        force=bool(getattr(args, "force", False)),
        progress=True,
        workers=int(getattr(args, "workers", None) or 2),
    )
    report = paths.root / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        for task, row in data.get("quality", {}).get("tasks", {}).items():
            print(f"{task:10s} " + "  ".join(f"{k}={v:.2f}" for k, v in row.items()))
    print(paths.root)
    return 0


def merge_main(args: Any) -> int:
    """Task arithmetic. ``args``: ``base``, ``experts`` (list), ``lambdas`` (list of float), ``out``; model refs
    may be directories or zoo:<name>."""
    from logitfusion.models.zoo.merge import merge_experts

    cache_dir = getattr(args, "cache_dir", None)
    out = merge_experts(
        _resolve_model(args.base, cache_dir),
        [_resolve_model(e, cache_dir) for e in args.experts],
        [float(x) for x in args.lambdas],
        Path(args.out),
    )
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m logitfusion.models.zoo [--force] [--cache-dir DIR] [--workers N]`: build the zoo."""
    p = argparse.ArgumentParser(prog="python -m logitfusion.models.zoo", description="build the tiny model zoo")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.add_argument("--cache-dir", default=None, help="where to build (default: $LOGITFUSION_CACHE or ~/.cache)")
    p.add_argument("--workers", type=int, default=2, help="training processes (one torch thread each)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return build_main(args)


if __name__ == "__main__":
    sys.exit(main())
