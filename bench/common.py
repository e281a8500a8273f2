"""What every benchmark section shares: the suite's configuration, timing, the machine's state and table output.

Timing rules (all sections): one torch thread per process, warm-up iterations before any timed one, the median of
the repeats. The machine's load average is recorded before and after every section, because the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.models import CPU_LARGE, CPU_SMALL, TINY_LARGE, TINY_SMALL, LlamaSize


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes and iteration counts of one suite run."""

    large: LlamaSize = CPU_LARGE  # the large base of the random family
    small: LlamaSize = CPU_SMALL  # the small base, and the size of every expert
    num_experts: int = 3  # experts in the family (the solver section uses 1 and all of them)
    prompt_tokens: int = 32  # prompt length of the random-family requests
    warmup_steps: int = 2  # Decoder steps after the prefill that are not timed
    measure_steps: int = 8  # timed Decoder steps per run
    repeats: int = 3  # runs per measurement; the median is reported
    main_batches: tuple[int, ...] = (1, 16)  # batches of the orchestration, baseline and distributed sections
    throughput_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    spec_new_tokens: int = 32  # tokens generated per request in the speculative section
    spec_draft_tokens: int = 4  # k
    spec_prompts: int = 2  # requests run one after another (batch 1) per speculative measurement
    spec_repeats: int = 2  # repeats of the speculative measurement (each runs every prompt plain and speculative)
    solver_vocab: int = 32000  # V of the solver section's absolute timings
    solver_batches: tuple[int, ...] = (1, 16)
    baseline_new_tokens: int = 16  # tokens per request in the sequential-loop comparison
    rtt_repeats: int = 200  # worker stream round trips timed
    pack_batches: tuple[int, ...] = (1, 4, 16)  # LocalRunner pack section
    pack_steps: int = 24
    vocab_sizes: tuple[int, ...] = (32000, 128256, 262144)  # V of section h (the Decoder step at real vocabularies)
    vocab_batches: tuple[int, ...] = (1, 16)
    distributed: bool = True  # run the Ray rows (skipped with a note when Ray cannot start)
    zoo: bool = True  # run the zoo rows (skipped with a note when no zoo is built)
    zoo_cache: str | None = None  # where to look for a built zoo besides the committed one (default: the cache)
    quick: bool = False

    @classmethod
    def full(cls) -> SuiteConfig:
        return cls()

    @classmethod
    def quick_config(cls) -> SuiteConfig:
        """About a minute: tiny models, few iterations, every code path."""
        return cls(
            large=TINY_LARGE,
            small=TINY_SMALL,
            num_experts=2,
            prompt_tokens=8,
            warmup_steps=1,
            measure_steps=3,
            repeats=1,
            throughput_batches=(1, 4, 16),
            spec_new_tokens=8,
            spec_prompts=1,
            spec_repeats=1,
            solver_vocab=32000,
            solver_batches=(1,),
            baseline_new_tokens=4,
            rtt_repeats=20,
            pack_batches=(1, 4),
            pack_steps=4,
            vocab_sizes=(32000,),
            vocab_batches=(1, 4),
            quick=True,
        )

    def with_(self, **changes: Any) -> SuiteConfig:
        return replace(self, **changes)


@dataclass
class Section:
    """One section's rows, printed as one markdown table."""

    key: str  # e.g. "a_speculative"
    title: str
    columns: list[str]  # row keys shown in the table, in order
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what limits these numbers
    skipped: list[str] = field(default_factory=list)  # parts not run, and why
    extra: dict[str, Any] = field(default_factory=dict)  # section-wide measurements (forward times, sizes)
    wall_s: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
            "skipped": self.skipped,
            "extra": self.extra,
            "wall_s": round(self.wall_s, 2),
            "loadavg_before": [round(x, 2) for x in self.load_before],
            "loadavg_after": [round(x, 2) for x in self.load_after],
        }


def run_section(key: str, fn: Callable[[], Section]) -> Section:
    """Run one section, stamping its wall time and the load average around it."""
    before, t0 = loadavg(), time.perf_counter()
    section = fn()
    section.key = key
    section.wall_s = time.perf_counter() - t0
    section.load_before, section.load_after = before, loadavg()
    return section


# ------------------------------------------------------------------------------------------------------------ timing


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (``clock``: wall by default,
    ``time.thread_time`` for this thread's CPU)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        if sync:
            sync()
        out.append(clock() - t0)
    return out


def ms(seconds: float, digits: int = 2) -> float:
    return round(seconds * 1e3, digits)


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in loadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - the engine needs it anyway
        pass
    return info


# ------------------------------------------------------------------------------------------------------------ output


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def render(section: Section) -> str:
    """The section as markdown: title, load, table, notes, skips."""
    out = [f"### {section.key}: {section.title}", ""]
    out.append(
        f"wall {section.wall_s:.1f} s; load average {section.load_before[0]:.2f} -> {section.load_after[0]:.2f}"
    )
    out.append("")
    if section.rows:
        out.append(markdown_table(section.columns, section.rows))
        out.append("")
    for key, value in section.extra.items():
        out.append(f"- {key}: {value}")
    for note in section.notes:
        out.append(f"- note: {note}")
    for skip in section.skipped:
        out.append(f"- skipped: {skip}")
    return "\n".join(out) + "\n"


def section_cli(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line of a section run on its own: --quick and --json (add more before parsing)."""
    ap = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    ap.add_argument("--json", type=Path, help="write the section's JSON here (parents created)")
    return ap


def run_section_cli(args: argparse.Namespace, make: Callable[[], Section]) -> int:
    """Logging and 1 torch thread, then build the section, print its table and write its JSON if asked."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    sec = make()
    print(render(sec))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(sec.to_json(), indent=1) + "\n")
    return 0
