"""Sections b and f: what orchestration costs on top of the models' own forwards.

b. efficiency = the slowest model's pure forward (alone, same batch, same cache length) / the fused step, in process
   (LocalRunners with their defaults) and distributed (one ModelWorker actor per model, RemoteRunners over gRPC
   streams).
f. the distributed step against the in-process step on the same (zoo) models, and the worker stream's round trip.

The machine is shared, so its load drifts during a section. Every repeat therefore measures the things it compares
back to back (the pure forwards, then the in-process run, then the distributed run), and the reported ratios are the
medians of the per-repeat ratios. CPU time (this process, plus the workers' processes for a distributed run, read
from /proc) is reported beside wall time: it measures work, which the load does not inflate much.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bench.common import Section, SuiteConfig, median, ms
from bench.distributed import LocalRay, Pipeline, random_specs, stream_round_trip_s, zoo_specs
from bench.drive import Arm, DecodeRun, Timing, make_decoder, paired_rounds, pure_forward_s, random_prompts
from bench.models import RandomFamily, Zoo, close_runners
from logitfusion.fusion import Recipe, presets

logger = logging.getLogger(__name__)

B_COLUMNS = [
    "mode", "recipe", "batch", "step_ms", "large_fwd_ms", "small_fwd_ms", "expert_fwd_ms", "efficiency", "overlap",
    "tok_s", "step_cpu_ms", "sum_fwd_cpu_ms", "extra_cpu_ms",
]
F_COLUMNS = ["models", "recipe", "batch", "inproc_step_ms", "dist_step_ms", "ratio", "target", "inproc_cpu_ms",
             "dist_cpu_ms", "cpu_ratio"]

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


def _arms(batch: int, recipe: Recipe, local: dict[str, Any], pipe: Pipeline | None) -> dict[str, Arm]:
    out = {"in-process": Arm(make_decoder(local, batch), recipe)}
    if pipe is not None:
        out["distributed"] = Arm(make_decoder(pipe.runners, batch), recipe, pipe.cpu_s)
    return out


def _rounds(cfg: SuiteConfig, arms: dict[str, Arm], prompts, before_each=lambda: None):
    return paired_rounds(arms, prompts, warmup_steps=cfg.warmup_steps, measure_steps=cfg.measure_steps,
                         repeats=cfg.repeats, before_each=before_each)


def _pipeline(ray: LocalRay | None, cfg: SuiteConfig, key: str, specs_fn: Callable[[], dict],
              sec: Section, what: str) -> Pipeline | None:
    if ray is None or not cfg.distributed:
        sec.skipped.append(f"{what}: distributed disabled (--no-distributed)")
        return None
    if not ray.start():
        sec.skipped.append(f"{what}: {ray.why}")
        return None
    try:
        return ray.pipeline(key, specs_fn())
    except Exception as exc:  # noqa: BLE001 - recorded as a skip with its reason
        logger.warning("pipeline %s failed", key, exc_info=True)
        sec.skipped.append(f"{what}: pipeline failed: {type(exc).__name__}: {exc}")
        return None


def orchestration_section(cfg: SuiteConfig, fam: RandomFamily, ray: LocalRay | None) -> Section:
    sec = Section(key="", title="orchestration efficiency: slowest pure forward / fused step", columns=B_COLUMNS)
    names = RANDOM_NAMES
    recipes = [presets.proxy_tuning(*names), presets.dlf("large", "small", ["expert_0"], solver="newton")]
    pipe = _pipeline(ray, cfg, "random", lambda: random_specs(names, fam.sizes), sec, "distributed rows")
    local = fam.runners(names)
    try:
        for recipe in recipes:
            for b in cfg.main_batches:
                prompts = random_prompts(b, cfg.prompt_tokens, fam.vocab_size, seed=b)

                def forwards(b: int = b) -> dict[str, Timing]:
                    return {n: pure_forward_s(fam.models[n], b, start_tokens=cfg.prompt_tokens + 1,
                                              warmup=cfg.warmup_steps, steps=cfg.measure_steps,
                                              vocab_size=fam.vocab_size) for n in names}

                fwd, runs = _rounds(cfg, _arms(b, recipe, local, pipe), prompts, forwards)
                for mode, mode_runs in runs.items():
                    sec.rows.append(_b_row(cfg, mode, recipe, b, fwd, mode_runs))
    finally:
        close_runners(local)
    sec.notes += [
        "efficiency = slowest model's pure forward (measured alone: one token, same batch, same cache length) / "
        "fused Decoder step (all models + fusion + sampling + bookkeeping); 1.0 would mean orchestration is free",
        "overlap = sum of the pure forwards / step: above 1 means the models really ran concurrently",
        f"each of {cfg.repeats} rounds times the pure forwards, then the in-process run, then the distributed run, "
        f"back to back ({cfg.measure_steps} steady steps after {cfg.warmup_steps} warm-up); ratios are medians of "
        f"per-round ratios; prompts of {cfg.prompt_tokens} random tokens",
        "step_cpu_ms: mean CPU per steady step of every process doing the work (in process: the Decoder's process, all "
        "threads; distributed: the Decoder's process + the 3 worker processes from /proc, 10 ms ticks averaged); "
        "extra_cpu_ms = step_cpu_ms - the models' own forward CPU: the work orchestration adds, robust to load, but a "
        "difference of two separate measurements (a few ms of noise)",
        "in-process: every LocalRunner in the Decoder's thread, one model after another (the default; threads on "
        "the GIL overlapped less than they cost); "
        "distributed: one Ray actor process per model with one torch thread, on the same 2 shared cores",
    ]
    return sec


def _b_row(cfg: SuiteConfig, mode: str, recipe: Recipe, batch: int, fwd: list[dict[str, Timing]],
           runs: list[DecodeRun]) -> dict[str, Any]:
    w = cfg.warmup_steps
    steps = [r.steady_step_s(w) for r in runs]
    cpus = [r.steady_cpu_s(w) for r in runs]
    slowest = [max(t.wall_s for t in f.values()) for f in fwd]
    total = [sum(t.wall_s for t in f.values()) for f in fwd]
    fwd_cpu = median([sum(t.cpu_s for t in f.values()) for f in fwd])
    step = median(steps)
    return {
        "mode": mode, "recipe": _label(recipe), "batch": batch, "step_ms": ms(step),
        "large_fwd_ms": ms(median([f["large"].wall_s for f in fwd])),
        "small_fwd_ms": ms(median([f["small"].wall_s for f in fwd])),
        "expert_fwd_ms": ms(median([f["expert_0"].wall_s for f in fwd])),
        "efficiency": round(median([a / s for a, s in zip(slowest, steps)]), 3),
        "overlap": round(median([a / s for a, s in zip(total, steps)]), 3),
        "tok_s": round(batch / step, 1), "step_cpu_ms": ms(median(cpus)), "sum_fwd_cpu_ms": ms(fwd_cpu),
        "extra_cpu_ms": ms(median(cpus) - fwd_cpu),
    }


def distributed_section(cfg: SuiteConfig, fam: RandomFamily, zoo: Zoo | None, zoo_why: str,
                        ray: LocalRay | None) -> Section:
    sec = Section(key="", title="distributed (Ray workers + gRPC streams) vs in-process step", columns=F_COLUMNS)
    if cfg.zoo and zoo is not None:
        names, label, vocab, key = ZOO_NAMES, f"zoo ({ZOO_TASK})", zoo.vocab_size, "zoo"
        local_fn: Callable[[], dict[str, Any]] = lambda: zoo.runners(names)  # noqa: E731
        specs_fn: Callable[[], dict] = lambda: zoo_specs(names, zoo)  # noqa: E731
        pool = zoo.prompts(ZOO_TASK, max(cfg.main_batches))
    else:
        sec.skipped.append(f"zoo models: {zoo_why or 'disabled'}; measured on the random family instead")
        names, label, vocab, key = RANDOM_NAMES, "random family", fam.vocab_size, "random"
        local_fn = lambda: fam.runners(names)  # noqa: E731
        specs_fn = lambda: random_specs(names, fam.sizes)  # noqa: E731
        pool = random_prompts(max(cfg.main_batches), cfg.prompt_tokens, vocab, seed=3)
    pipe = _pipeline(ray, cfg, key, specs_fn, sec, "whole section")
    if pipe is None:
        return sec
    recipe = presets.dlf(names[0], names[1], [names[2]], solver="newton")
    local = local_fn()
    try:
        for b in cfg.main_batches:
            prompts = [pool[i % len(pool)] for i in range(b)]
            _, runs = _rounds(cfg, _arms(b, recipe, local, pipe), prompts)
            sec.rows.append(_f_row(cfg, label, recipe, b, runs["in-process"], runs["distributed"]))
    finally:
        close_runners(local)
    rtt = {n: median(stream_round_trip_s(r, warmup=10, repeats=cfg.rtt_repeats)) for n, r in pipe.runners.items()}
    sec.extra["stream_round_trip_ms (empty plan, median)"] = {n: ms(v, 3) for n, v in rtt.items()}
    sec.notes += [
        "same models, prompts and recipe (DLF newton, one expert); in-process = LocalRunners (defaults: unthreaded, "
        "lean forward) in the Decoder's process, distributed = ModelWorker actors on local Ray, one gRPC bidi "
        "stream each; each of "
        f"{cfg.repeats} rounds runs both back to back; ratio = median of per-round step ratios",
        "cpu_ms: mean CPU per steady step of every process involved (distributed: Decoder + 3 workers, from /proc)",
        "stream round trip: an empty StepPlan through RemoteRunner -> worker -> back (no model work), after 10 "
        f"warm-up trips, median of {cfg.rtt_repeats}",
        "on 2 shared cores a distributed step needs 4 processes to be scheduled in turn, so a loaded machine adds "
        "scheduler wake-up latency to every hop; the CPU columns show the work the distributed path really adds",
    ]
    return sec


def _f_row(cfg: SuiteConfig, label: str, recipe: Recipe, batch: int, inproc: list[DecodeRun],
           dist: list[DecodeRun]) -> dict[str, Any]:
    w = cfg.warmup_steps
    ratio = median([d.steady_step_s(w) / i.steady_step_s(w) for i, d in zip(inproc, dist)])
    i_cpu, d_cpu = median([r.steady_cpu_s(w) for r in inproc]), median([r.steady_cpu_s(w) for r in dist])
    return {
        "models": label, "recipe": _label(recipe), "batch": batch,
        "inproc_step_ms": ms(median([r.steady_step_s(w) for r in inproc])),
        "dist_step_ms": ms(median([r.steady_step_s(w) for r in dist])), "ratio": round(ratio, 3),
        "target": ("<= 1.10: " + ("met" if ratio <= 1.10 else "missed")) if batch >= 16 else "-",
        "inproc_cpu_ms": ms(i_cpu), "dist_cpu_ms": ms(d_cpu), "cpu_ratio": round(d_cpu / i_cpu, 3),
    }
