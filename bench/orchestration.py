"""Sections b and f: what orchestration costs on top of the models' own forwards.

b. efficiency = the slowest model's pure forward (alone, same batch, same cache length) / the fused step, in process
   (threaded LocalRunners) and distributed (one ModelWorker actor per model, RemoteRunners over gRPC streams).
f. the distributed step against the in-process step on the same (zoo) models, and the worker stream's round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bench.common import Section, SuiteConfig, median, ms
from bench.distributed import LocalRay, random_specs, stream_round_trip_s, zoo_specs
from bench.drive import Timing, pure_forward_s, steady_step
from bench.models import RandomFamily, Zoo, close_runners
from logitfusion.fusion import Recipe, presets

logger = logging.getLogger(__name__)

B_COLUMNS = [
    "mode", "recipe", "batch", "step_ms", "large_fwd_ms", "small_fwd_ms", "expert_fwd_ms", "sum_fwd_ms",
    "efficiency", "overlap", "tok_s", "step_cpu_ms", "sum_fwd_cpu_ms", "extra_cpu_ms",
]
F_COLUMNS = ["models", "recipe", "batch", "inproc_step_ms", "dist_step_ms", "ratio", "target", "overhead_ms",
             "inproc_cpu_ms", "driver_cpu_ms"]


RANDOM_NAMES = ["large", "small", "expert_0"]
ZOO_TASK = "capital"
ZOO_NAMES = ["large", "small", f"expert_{ZOO_TASK}"]


def start_pipelines(ray: LocalRay, fam: RandomFamily, zoo: Zoo | None) -> None:
    """Start every pipeline the distributed rows use at once and wait until all are up, so no worker is still
    building its model while something is being timed."""
    if not ray.start():
        return
    specs = {"random": random_specs(RANDOM_NAMES, fam.sizes)}
    if zoo is not None:
        specs["zoo"] = zoo_specs(ZOO_NAMES, zoo)
    try:
        for key, s in specs.items():
            ray.request(key, s)
        for key, s in specs.items():
            ray.pipeline(key, s)
    except Exception as exc:  # noqa: BLE001 - a pipeline that cannot start turns the distributed rows into a skip
        logger.warning("distributed pipelines failed to start", exc_info=True)
        ray.fail(f"workers failed to start: {type(exc).__name__}: {exc}")


def _label(recipe: Recipe) -> str:
    return recipe.method if recipe.solver is None else f"dlf-{recipe.solver}"


def _steps(cfg: SuiteConfig, runners: dict[str, Any], recipe: Recipe, batch: int, vocab: int,
           prompts: list[list[int]] | None = None) -> Timing:
    step, _ = steady_step(runners, recipe, batch, prompt_tokens=cfg.prompt_tokens, vocab_size=vocab,
                          warmup_steps=cfg.warmup_steps, measure_steps=cfg.measure_steps, repeats=cfg.repeats,
                          prompts=prompts)
    return step


def orchestration_section(cfg: SuiteConfig, fam: RandomFamily, ray: LocalRay | None) -> Section:
    sec = Section(key="", title="orchestration efficiency: slowest pure forward / fused step", columns=B_COLUMNS)
    names = RANDOM_NAMES
    recipes = [presets.proxy_tuning(*names), presets.dlf("large", "small", ["expert_0"], solver="newton")]
    fwd: dict[int, dict[str, Timing]] = {}
    for b in cfg.main_batches:
        fwd[b] = {
            n: pure_forward_s(fam.models[n], b, start_tokens=cfg.prompt_tokens + 1, warmup=cfg.warmup_steps,
                              steps=cfg.measure_steps, vocab_size=fam.vocab_size)
            for n in names
        }

    def rows(mode: str, runners: dict[str, Any]) -> None:
        for recipe in recipes:
            for b in cfg.main_batches:
                t = _steps(cfg, runners, recipe, b, fam.vocab_size)
                wall = {n: x.wall_s for n, x in fwd[b].items()}
                cpu = sum(x.cpu_s for x in fwd[b].values())
                local = mode == "in-process"  # the driver's CPU holds the models' work only in process
                sec.rows.append({
                    "mode": mode, "recipe": _label(recipe), "batch": b, "step_ms": ms(t.wall_s),
                    "large_fwd_ms": ms(wall["large"]), "small_fwd_ms": ms(wall["small"]),
                    "expert_fwd_ms": ms(wall["expert_0"]), "sum_fwd_ms": ms(sum(wall.values())),
                    "efficiency": round(max(wall.values()) / t.wall_s, 3),
                    "overlap": round(sum(wall.values()) / t.wall_s, 3), "tok_s": round(b / t.wall_s, 1),
                    "step_cpu_ms": ms(t.cpu_s), "sum_fwd_cpu_ms": ms(cpu) if local else None,
                    "extra_cpu_ms": ms(t.cpu_s - cpu) if local else None,
                })

    local = fam.runners(names)
    try:
        rows("in-process", local)
    finally:
        close_runners(local)
    if ray is None or not cfg.distributed:
        sec.skipped.append("distributed rows: disabled (--no-distributed)")
    elif not ray.start():
        sec.skipped.append(f"distributed rows: {ray.why}")
    else:
        rows("distributed", ray.pipeline("random", random_specs(names, fam.sizes)).runners)
    sec.notes += [
        "efficiency = slowest model's pure forward (measured alone: one token, same batch, same cache length) / "
        "fused Decoder step (all models + fusion + sampling + bookkeeping); 1.0 would mean orchestration is free",
        "overlap = sum of the pure forwards / step: above 1 means the models really ran concurrently",
        "step_cpu_ms: CPU time of the Decoder's process per step (all threads); in process, extra_cpu_ms = that minus "
        "the models' own forward CPU: the work orchestration adds (fusion, padding, bookkeeping), robust to load; "
        "distributed, the driver's CPU excludes the workers' forwards",
        f"median of {cfg.repeats} runs x {cfg.measure_steps} steady steps after {cfg.warmup_steps} warm-up steps; "
        f"prompts of {cfg.prompt_tokens} random tokens",
        "in-process: one thread per LocalRunner in one Python process (the GIL serialises their Python work); "
        "distributed: one Ray actor process per model, each with one torch thread, on the same 2 shared cores, so "
        "the Decoder process competes with the workers for CPU",
        "on CPU the fusion of [B, V] log-probs is not free next to such small models (see section c)",
    ]
    return sec


def distributed_section(cfg: SuiteConfig, fam: RandomFamily, zoo: Zoo | None, zoo_why: str,
                        ray: LocalRay | None) -> Section:
    sec = Section(key="", title="distributed (Ray workers + gRPC streams) vs in-process step", columns=F_COLUMNS)
    if ray is None or not cfg.distributed:
        sec.skipped.append("whole section: distributed disabled (--no-distributed)")
        return sec
    if not ray.start():
        sec.skipped.append(f"whole section: {ray.why}")
        return sec
    if cfg.zoo and zoo is not None:
        names = ZOO_NAMES
        label = f"zoo ({ZOO_TASK})"
        vocab = zoo.vocab_size
        local_fn: Callable[[], dict[str, Any]] = lambda: zoo.runners(names)  # noqa: E731
        key, specs = "zoo", zoo_specs(names, zoo)
        prompts = zoo.prompts(ZOO_TASK, max(cfg.main_batches))
    else:
        sec.skipped.append(f"zoo models: {zoo_why or 'disabled'}; measured on the random family instead")
        names = RANDOM_NAMES
        label = "random family"
        vocab = fam.vocab_size
        local_fn = lambda: fam.runners(names)  # noqa: E731
        key, specs = "random", random_specs(names, fam.sizes)
        prompts = None
    recipe = presets.dlf(names[0], names[1], [names[2]], solver="newton")
    inproc: dict[int, Timing] = {}
    local = local_fn()
    try:
        for b in cfg.main_batches:
            inproc[b] = _steps(cfg, local, recipe, b, vocab, prompts)
    finally:
        close_runners(local)
    pipe = ray.pipeline(key, specs)
    dist = {b: _steps(cfg, pipe.runners, recipe, b, vocab, prompts) for b in cfg.main_batches}
    rtt = {n: median(stream_round_trip_s(r, warmup=10, repeats=cfg.rtt_repeats)) for n, r in pipe.runners.items()}
    for b in cfg.main_batches:
        ratio = dist[b].wall_s / inproc[b].wall_s
        sec.rows.append({
            "models": label, "recipe": _label(recipe), "batch": b, "inproc_step_ms": ms(inproc[b].wall_s),
            "dist_step_ms": ms(dist[b].wall_s), "ratio": round(ratio, 3),
            "target": ("<= 1.10: " + ("met" if ratio <= 1.10 else "MISSED")) if b >= 16 else "-",
            "overhead_ms": ms(dist[b].wall_s - inproc[b].wall_s),
            "inproc_cpu_ms": ms(inproc[b].cpu_s), "driver_cpu_ms": ms(dist[b].cpu_s),
        })
    sec.extra["stream_round_trip_ms (empty plan, median)"] = {n: ms(v, 3) for n, v in rtt.items()}
    sec.notes += [
        "same models, same prompts, same recipe (DLF newton, one expert); in-process = threaded LocalRunners in the "
        "Decoder's process, distributed = ModelWorker actors on local Ray, one gRPC bidi stream each",
        "stream round trip: an empty StepPlan through RemoteRunner -> worker -> back (no model work), after 10 "
        f"warm-up trips, median of {cfg.rtt_repeats}",
        "with tiny models the per-step cost is dominated by Python and the 2 shared cores, not by the network",
        "inproc_cpu_ms: the in-process step's CPU (models included); driver_cpu_ms: the distributed Decoder "
        "process's CPU per step (fusion, gRPC client, no model work)",
    ]
    return sec
