"""Section h: the whole in-process Decoder step at real vocabulary sizes, per recipe.

Five random 1-layer Llamas (hidden 32) share a vocabulary of V = 32,000, 128,256 (Llama 3) or 262,144 (Gemma 3), so
the forwards are cheap and what grows with V shows: the output layer, the logits' copies, fusion, the DLF solve and
sampling. Recipes: the large model alone, proxy-tuning with 1 expert, static alphas with 3 experts, DLF newton with 1
expert, DLF grid and joint with 3. Every recipe runs in the same round, back to back (paired rounds), and the ratios
are medians of per-round ratios:

    newton_1e / proxy_1e, grid_3e / static_3e, joint_3e / static_3e   (issue 8 targets: 1.15, 1.15, 1.3)
    static_3e / floor: the floor is one pass over every model's logits (a log_softmax of the five [B, V]) plus the
    five forwards of the same step (the "large alone" arm's forward times five models' shares, measured per model)

    python -m bench.vocab_step [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from bench.common import Section, markdown_table, median, ms
from bench.drive import Arm, make_decoder, paired_rounds, random_prompts
from bench.models import LlamaSize, build_llama, random_runner
from logitfusion.fusion import presets

logger = logging.getLogger("bench.vocab_step")

ONE_LAYER = LlamaSize(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                      max_length_tokens=256, init_range=0.5)
NAMES = ("large", "small", "expert_0", "expert_1", "expert_2")
RECIPES = {
    "large_alone": presets.single("large"),
    "proxy_1e": presets.proxy_tuning("large", "small", "expert_0", 1.0),
    "static_3e": presets.static("large", "small", ["expert_0", "expert_1", "expert_2"], [1.0, 0.5, 0.5]),
    "newton_1e": presets.dlf("large", "small", ["expert_0"], solver="newton"),
    "grid_3e": presets.dlf("large", "small", ["expert_0", "expert_1", "expert_2"], solver="grid"),
    "joint_3e": presets.dlf("large", "small", ["expert_0", "expert_1", "expert_2"], solver="joint"),
}
COLUMNS = ["V", "batch", *(f"{r}_ms" for r in RECIPES), "floor_ms", "newton1e_over_proxy", "grid3e_over_static",
           "joint3e_over_static", "static_3e_fusion_ms", "static_fusion_over_floor"]


def _floor_s(batch: int, vocab: int, rounds: int = 7) -> float:
    """One pass over five models' logits: log_softmax of five [B, V] fp32 matrices (median of ``rounds``)."""
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(batch, vocab, generator=g) for _ in NAMES]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for m in mats:
            torch.log_softmax(m, dim=-1)
        times.append(time.perf_counter() - t0)
    return median(times)


def vocab_rows(vocabs: tuple[int, ...], batches: tuple[int, ...], *, warmup: int, steps: int, repeats: int,
               recipes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    recipes = recipes or RECIPES
    rows = []
    for vocab in vocabs:
        size = replace(ONE_LAYER, vocab_size=vocab)
        models = {n: build_llama(replace(size, seed=i + 1)) for i, n in enumerate(NAMES)}
        runners = {n: random_runner(n, size, model=models[n], threaded=False) for n in NAMES}
        for batch in batches:
            decoder = make_decoder(runners, batch)
            prompts = random_prompts(batch, 8, vocab, seed=batch)
            # the arms' "CPU clock" is the runners' time inside plans: step_cpu_s then holds each step's forward time
            busy = lambda rs=runners: sum(r.stats.get("busy_s", 0.0) for r in rs.values())  # noqa: E731
            arms = {label: Arm(decoder, recipe, busy) for label, recipe in recipes.items()}
            _, runs = paired_rounds(arms, prompts, warmup_steps=warmup, measure_steps=steps, repeats=repeats)
            step = {label: [r.steady_step_s(warmup) for r in rs] for label, rs in runs.items()}
            fusion_side = {label: [r.steady_step_s(warmup) - r.steady_cpu_s(warmup) for r in rs]
                           for label, rs in runs.items()}
            row: dict[str, Any] = {"V": vocab, "batch": batch}
            for label in recipes:
                row[f"{label}_ms"] = ms(median(step[label]))
            floor = _floor_s(batch, vocab)
            row["floor_ms"] = ms(floor)

            def ratio(a: str, b: str) -> float | None:
                if a not in step or b not in step:
                    return None
                return round(median([x / y for x, y in zip(step[a], step[b])]), 2)

            row["newton1e_over_proxy"] = ratio("newton_1e", "proxy_1e")
            row["grid3e_over_static"] = ratio("grid_3e", "static_3e")
            row["joint3e_over_static"] = ratio("joint_3e", "static_3e")
            if "static_3e" in step:
                row["static_3e_fusion_ms"] = ms(median(fusion_side["static_3e"]))
                row["static_fusion_over_floor"] = round(median(fusion_side["static_3e"]) / max(floor, 1e-9), 1)
            rows.append(row)
            logger.info("V=%d b=%d: %s", vocab, batch, row)
        for r in runners.values():
            r.close()
        del models, runners
    return rows


DIST_COLUMNS = ["V", "batch", "recipe", "in_process_ms", "distributed_ms", "distributed_over_in_process",
                "identical"]


def distributed_rows(vocab: int, batch: int, *, warmup: int, steps: int, repeats: int,
                     labels: tuple[str, ...] = ("static_3e", "newton_1e")) -> tuple[list[dict[str, Any]], str]:
    """The same step with the five models in Ray worker processes behind gRPC streams, against in-process runners
    (paired rounds). Returns (rows, why skipped or "")."""
    from bench.distributed import LocalRay, random_specs

    size = replace(ONE_LAYER, vocab_size=vocab)
    sizes = {n: replace(size, seed=i + 1) for i, n in enumerate(NAMES)}
    ray = LocalRay()
    if not ray.start():
        return [], ray.why
    rows = []
    try:
        pipe = ray.pipeline("vocab", random_specs(list(NAMES), sizes))
        local = {n: random_runner(n, sizes[n], threaded=False) for n in NAMES}
        prompts = random_prompts(batch, 8, vocab, seed=batch)
        for label in labels:
            arms = {"in": Arm(make_decoder(local, batch), RECIPES[label]),
                    "dist": Arm(make_decoder(pipe.runners, batch), RECIPES[label], pipe.cpu_s)}
            _, runs = paired_rounds(arms, prompts, warmup_steps=warmup, measure_steps=steps, repeats=repeats)
            a = [r.steady_step_s(warmup) for r in runs["in"]]
            b = [r.steady_step_s(warmup) for r in runs["dist"]]
            rows.append({
                "V": vocab, "batch": batch, "recipe": label, "in_process_ms": ms(median(a)),
                "distributed_ms": ms(median(b)), "distributed_over_in_process": round(median(
                    [y / x for x, y in zip(a, b)]), 2),
                "identical": all(x.outputs == y.outputs for x, y in zip(runs["in"], runs["dist"])),
            })
            logger.info("distributed V=%d b=%d: %s", vocab, batch, rows[-1])
        for r in local.values():
            r.close()
    finally:
        ray.shutdown()
    return rows, ""


def vocab_section(cfg: Any, vocabs: tuple[int, ...] | None = None, batches: tuple[int, ...] | None = None) -> Section:
    """The suite's section h (``vocabs`` / ``batches`` override the defaults)."""
    sec = Section(key="h_vocab_step", title="in-process Decoder step at real vocabularies (5 random 1-layer Llamas, "
                  "hidden 32), ms", columns=COLUMNS)
    quick = getattr(cfg, "quick", False)
    vocabs = vocabs or getattr(cfg, "vocab_sizes", None) or ((32000,) if quick else (32000, 128256, 262144))
    batches = batches or getattr(cfg, "vocab_batches", None) or ((1, 4) if quick else (1, 16))
    if quick:
        sec.rows = vocab_rows(vocabs, batches, warmup=1, steps=3, repeats=2)
    else:
        sec.rows = vocab_rows(vocabs, batches, warmup=2, steps=6, repeats=3)
    if getattr(cfg, "distributed", True):
        v, b = (vocabs[0], max(batches)) if quick else (128256, 16)
        dist, why = distributed_rows(v, b, warmup=1 if quick else 2, steps=3 if quick else 6, repeats=2 if quick else 3)
        table = "\n\n" + markdown_table(DIST_COLUMNS, dist) if dist else why
        sec.extra["distributed (workers over gRPC streams) vs in-process"] = table
        if why:
            sec.skipped.append(f"distributed rows: {why}")
    sec.notes += [
        "each cell: median steady Decoder step (greedy; forwards of every model the recipe reads + fusion + solve + "
        "sampling); ratios are medians of per-round ratios (all recipes run back to back in each round)",
        "floor_ms: one log_softmax pass over the five models' [B, V] logits, the least any fusion must read; "
        "static_3e_fusion_ms: the static 3-expert step minus the time the runners spent in their plans (forwards): "
        "the Decoder's own side (fusion, sampling, bookkeeping), to compare with the floor",
        "targets (issue 8, V = 128,256, batch 16): newton1e_over_proxy <= 1.15, grid3e_over_static <= 1.15, "
        "joint3e_over_static <= 1.3; distributed_over_in_process <= 1.2",
    ]
    return sec


def main(argv: list[str] | None = None) -> int:
    from bench.common import run_section_cli, section_cli

    ap = section_cli("python -m bench.vocab_step", __doc__)
    ap.add_argument("--vocab", type=int, nargs="*", help="vocabulary sizes (default: the section's)")
    ap.add_argument("--batch", type=int, nargs="*", help="batch sizes (default: the section's)")
    ap.add_argument("--no-distributed", action="store_true", help="skip the Ray rows")
    args = ap.parse_args(argv)
    cfg = argparse.Namespace(quick=args.quick, distributed=not args.no_distributed)
    return run_section_cli(
        args, lambda: vocab_section(cfg, tuple(args.vocab or ()) or None, tuple(args.batch or ()) or None)
    )


if __name__ == "__main__":
    sys.exit(main())
