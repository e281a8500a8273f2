"""Transfer metrics of docs/algorithms.md §10, and the report table.

Two figures are always shown side by side and never mixed up:
- gap closed  = (fused - large base) / (large fine-tuned - large base)   (the honest one)
- score ratio = fused / large fine-tuned                                (the paper's headline)
plus PGR against the small expert: (fused - small expert) / (large fine-tuned - small expert).
A ratio whose denominator is (near) zero is undefined and reported as None, never as a huge number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

_EPS = 1e-9


def _ratio(num: float, den: float) -> float | None:
    return None if abs(den) < _EPS or math.isnan(den) else num / den


def gap_closed(fused: float, large_base: float, large_finetuned: float) -> float | None:
    return _ratio(fused - large_base, large_finetuned - large_base)


def score_ratio(fused: float, large_finetuned: float) -> float | None:
    return _ratio(fused, large_finetuned)


def pgr(fused: float, expert: float, large_finetuned: float) -> float | None:
    return _ratio(fused - expert, large_finetuned - expert)


@dataclass(frozen=True)
class Row:
    """One (task, method) result: the unit of the JSON report."""

    task: str
    method: str
    accuracy: float
    gap_closed: float | None
    score_ratio: float | None
    pgr: float | None
    n_items: int
    setting: str = "single"  # single | multi | unseen | fewshot | merged


def make_rows(
    task: str,
    accuracies: dict[str, float],
    n_items: int,
    *,
    settings: dict[str, str] | None = None,
    large_base: str = "large_base",
    expert: str = "expert",
    large_finetuned: str = "large_finetuned",
) -> list[Row]:
    """Rows for every method of one task; the reference methods must be among ``accuracies``."""
    for ref in (large_base, large_finetuned):
        if ref not in accuracies:
            raise ValueError(f"accuracies for task {task!r} lack the reference method {ref!r}")
    lb, lft = accuracies[large_base], accuracies[large_finetuned]
    ex = accuracies.get(expert)
    settings = settings or {}
    rows = []
    for method, acc in accuracies.items():
        rows.append(
            Row(
                task=task,
                method=method,
                accuracy=acc,
                gap_closed=gap_closed(acc, lb, lft),
                score_ratio=score_ratio(acc, lft),
                pgr=None if ex is None else pgr(acc, ex, lft),
                n_items=n_items,
                setting=settings.get(method, "single"),
            )
        )
    return rows


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table: one line per (task, method)."""
    head = "| task | setting | method | accuracy | gap closed | score ratio | PGR | n |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.setting} | {r.method} | {_fmt(r.accuracy)} | {_fmt(r.gap_closed)} | "
            f"{_fmt(r.score_ratio)} | {_fmt(r.pgr)} | {r.n_items} |"
        )
    return "\n".join(lines)


def write_json(rows: Iterable[Row], path: str | Path) -> None:
    """The report as a JSON list, one object per (task, method)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
