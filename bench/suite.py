"""The CPU benchmark suite: one run, one JSON, one markdown table per section.

    python -m bench.suite --json results/bench.json            # `make bench`, about 10 minutes on 2 cores
    python -m bench.suite --quick --json /tmp/b.json           # about a minute: tiny models, every code path
    python -m bench.suite --sections a,c --no-distributed

Sections:
  a  speculative vs plain fused decoding, with acceptance (random, agreeing-by-construction and zoo models)
  b  orchestration efficiency: slowest pure forward / fused step, in process and distributed, batch 1 and 16
  c  the DLF solver's share of a step per solver and number of experts, and its absolute time at V = 32000
  d  fused tokens/s against batch size 1..64
  e  the Decoder against the naive sequential three-model loop (proxy-tuning reference), batch 1 and 16
  f  distributed (Ray workers + gRPC streams) vs in-process step on the zoo models, and the stream round trip
  g  LocalRunner alone: decode pack kept vs re-padded (bench.engine_local)
  h  the whole Decoder step at V = 32k / 128k / 262k per recipe, and distributed vs in-process (bench.vocab_step)
  i  the Decoder against the proxy-tuning reference code on the zoo (bench.peer; needs LOGITFUSION_PEER_DIR)
  j  fuse() alone at real vocabularies: dense path vs one pass + certified candidate support (bench.fusion_vocab)

Every number carries the machine's load average: the 2 cores are shared with other work, so timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import torch

from bench.common import Section, SuiteConfig, loadavg, machine_info, render, run_section

logger = logging.getLogger("bench.suite")

SECTION_KEYS = {
    "a": "a_speculative",
    "b": "b_orchestration",
    "c": "c_solver_share",
    "d": "d_throughput",
    "e": "e_baseline",
    "f": "f_distributed",
    "g": "g_local_pack",
    "h": "h_vocab_step",
    "i": "i_peer",
    "j": "j_fusion_vocab",
}


def parse_sections(text: str) -> list[str]:
    """"a,c" -> ["a", "c"] in suite order; a ValueError names an unknown letter."""
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTION_KEYS]
    if unknown or not wanted:
        raise ValueError(f"--sections={text!r}: use letters from {','.join(SECTION_KEYS)}")
    return [s for s in SECTION_KEYS if s in wanted]


def build_sections(cfg: SuiteConfig, letters: list[str]) -> tuple[list[tuple[str, Callable[[], Section]]], Callable]:
    """The selected sections as (key, thunk), and a cleanup to call at the end. Models are built once, here."""
    from bench.distributed import LocalRay
    from bench.engine_local import pack_section
    from bench.peer import peer_section
    from bench.vocab_step import vocab_section
    from bench.models import RandomFamily, find_zoo
    from bench.orchestration import distributed_section, orchestration_section, start_pipelines
    from bench.solver_share import solver_section
    from bench.speculative import speculative_section
    from bench.throughput import baseline_section, throughput_section

    t0 = time.perf_counter()
    fam = RandomFamily(cfg.large, cfg.small, cfg.num_experts)
    logger.info("random family built in %.1f s: large %s, small %s", time.perf_counter() - t0, cfg.large.label(),
                cfg.small.label())
    zoo, zoo_why = find_zoo(cfg.zoo_cache) if cfg.zoo else (None, "disabled (--no-zoo)")
    ray = LocalRay() if cfg.distributed else None
    started = False

    def distributed_first() -> None:
        """Before the first section with distributed rows: every worker up at once, before anything is timed."""
        nonlocal started
        if ray is not None and not started:
            started = True
            start_pipelines(ray, fam, zoo if cfg.zoo and "f" in letters else None)

    table: dict[str, Callable[[], Section]] = {
        "a": lambda: speculative_section(cfg, fam, zoo, zoo_why),
        "b": lambda: (distributed_first(), orchestration_section(cfg, fam, ray))[1],
        "c": lambda: solver_section(cfg, fam),
        "d": lambda: throughput_section(cfg, fam),
        "e": lambda: baseline_section(cfg, fam),
        "f": lambda: (distributed_first(), distributed_section(cfg, fam, zoo, zoo_why, ray))[1],
        "g": lambda: pack_section(cfg),
        "h": lambda: vocab_section(cfg),
        "i": lambda: peer_section(cfg),
        "j": lambda: fusion_vocab_section(cfg),
    }

    def cleanup() -> None:
        if ray is not None:
            ray.shutdown()

    return [(SECTION_KEYS[s], table[s]) for s in letters], cleanup


def fusion_vocab_section(cfg: SuiteConfig) -> Section:
    """bench.fusion_vocab's dict as a Section: its per-recipe rows as the table, its ratio rows in ``extra``."""
    from bench.common import markdown_table
    from bench.fusion_vocab import vocab_section as fuse_alone

    doc = fuse_alone(cfg.quick)
    rows = [{c: r.get(c) for c in doc["columns"]} | r for r in doc["rows"]]  # static rows have no DLF columns
    sec = Section(key="", title=doc["title"], columns=doc["columns"], rows=rows, notes=list(doc["notes"]))
    sec.extra["ratios"] = "\n\n" + markdown_table(doc["ratio_columns"], doc["ratios"])
    return sec


def run_suite(cfg: SuiteConfig, letters: list[str], out: TextIO | None = None) -> dict[str, Any]:
    """Run the sections in order, print each table as it finishes (to ``out``, stdout by default), and return the
    JSON document."""
    out = out or sys.stdout
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"machine": machine_info(), "config": asdict(cfg), "sections": {}, "markdown": []}
    sections, cleanup = build_sections(cfg, letters)
    try:
        for key, thunk in sections:
            logger.info("section %s ...", key)
            sec = run_section(key, thunk)
            doc["sections"][key] = sec.to_json()
            text = render(sec)
            doc["markdown"].append(text)
            print(text, file=out, flush=True)
    finally:
        cleanup()
    doc["total_wall_s"] = round(time.perf_counter() - t0, 1)
    doc["loadavg_end"] = [round(x, 2) for x in loadavg()]
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here (parents created)")
    ap.add_argument("--markdown", type=Path, help="also write every section's table here")
    ap.add_argument("--quick", action="store_true", help="tiny models and iteration counts (about a minute)")
    ap.add_argument("--sections", default=",".join(SECTION_KEYS), help="comma-separated letters a..g")
    ap.add_argument("--no-distributed", action="store_true", help="skip the Ray rows")
    ap.add_argument("--no-zoo", action="store_true", help="skip the zoo rows")
    ap.add_argument("--zoo-cache", help="a zoo cache directory to search besides the committed zoo")
    args = ap.parse_args(argv)
    try:
        letters = parse_sections(args.sections)
    except ValueError as exc:
        ap.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = SuiteConfig.quick_config() if args.quick else SuiteConfig.full()
    cfg = cfg.with_(distributed=not args.no_distributed, zoo=not args.no_zoo, zoo_cache=args.zoo_cache)
    print(f"## logitfusion CPU benchmarks ({'quick' if cfg.quick else 'full'})\n\nmachine: {machine_info()}\n",
          flush=True)
    doc = run_suite(cfg, letters)
    print(f"total {doc['total_wall_s']} s; load average at the end {doc['loadavg_end']}")
    markdown = doc.pop("markdown")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        head = f"## logitfusion CPU benchmarks ({'quick' if cfg.quick else 'full'})\n\nmachine: {doc['machine']}\n\n"
        tail = f"total {doc['total_wall_s']} s; load average at the end {doc['loadavg_end']}\n"
        args.markdown.write_text(head + "\n".join(markdown) + tail)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
