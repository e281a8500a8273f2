"""Section c: the DLF solver's share of a decoding step (docs/algorithms.md §3: the target is < 3% of a step).

Per solver (grid, newton, joint) and number of experts T: the solver alone on a prepared problem, the whole fusion
(log-softmax, preparation, solver, the fused scores), the static fusion of the same models for comparison, and the
Decoder's steady step with that recipe. The solver's cost does not depend on the values (fixed iteration counts), so
its inputs are random logits; the absolute time is also taken at V = 32000, a Llama vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from bench.common import Section, SuiteConfig, median, ms, time_call
from bench.drive import Arm, make_decoder, paired_rounds, random_prompts
from bench.models import RandomFamily, close_runners
from logitfusion.fusion import SOLVERS, fuse, presets
from logitfusion.fusion.dlf import problem_from_log_probs, solve_problem

COLUMNS = [
    "solver", "experts", "batch", "solve_ms", "fuse_ms", "static_fuse_ms", "step_ms", "solver_share",
    "under_3pct", "solve_cpu_ms", "step_cpu_ms", "share_cpu", "solve_ms_v32000",
]


def random_logits(names: list[str], batch: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Peaked random logits per model: [B, V] each."""
    g = torch.Generator().manual_seed(seed)
    return {n: 3.0 * torch.randn(batch, vocab, generator=g) for n in names}


def solve_s(logits: Mapping[str, torch.Tensor], experts: list[str], solver: str, repeats: int,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of the solver alone on the prepared problem of ``logits``."""
    lp = {n: torch.log_softmax(x, -1) for n, x in logits.items()}  # [B, V] each
    pb = problem_from_log_probs(lp["large"], lp["small"], [lp[e] for e in experts])
    return median(time_call(lambda: solve_problem(pb, solver, 2.0), warmup=1, repeats=repeats, clock=clock))


def solver_section(cfg: SuiteConfig, fam: RandomFamily) -> Section:
    sec = Section(key="", title="DLF solver share of a fused step", columns=COLUMNS)
    counts = sorted({1, len(fam.experts)})
    reps = 3 if cfg.quick else 5
    w = cfg.warmup_steps
    for t in counts:
        experts = fam.experts[:t]
        names = ["large", "small", *experts]
        runners = fam.runners(names)
        try:
            for b in cfg.solver_batches:
                logits = random_logits(names, b, fam.vocab_size)
                big = random_logits(names, b, cfg.solver_vocab, seed=1)
                static = presets.static("large", "small", experts)
                static_s = median(time_call(lambda: fuse(logits, static), warmup=1, repeats=reps))
                decoder = make_decoder(runners, b)
                prompts = random_prompts(b, cfg.prompt_tokens, fam.vocab_size, seed=b)
                for solver in SOLVERS:
                    recipe = presets.dlf("large", "small", experts, solver=solver)

                    def solve_now(solver: str = solver) -> tuple[float, float]:
                        return (solve_s(logits, experts, solver, reps),
                                solve_s(logits, experts, solver, reps, clock=time.thread_time))

                    # each round: the solver alone, then a Decoder run with that recipe (a drifting load hits both)
                    solves, runs = paired_rounds({"dlf": Arm(decoder, recipe)}, prompts, warmup_steps=w,
                                                 measure_steps=cfg.measure_steps, repeats=cfg.repeats,
                                                 before_each=solve_now)
                    steps = [r.steady_step_s(w) for r in runs["dlf"]]
                    step_cpu = median([r.steady_cpu_s(w) for r in runs["dlf"]])
                    solve, solve_cpu = median([x[0] for x in solves]), median([x[1] for x in solves])
                    share = median([x[0] / s for x, s in zip(solves, steps)])
                    fuse_s = median(time_call(lambda: fuse(logits, recipe), warmup=1, repeats=reps))
                    sec.rows.append({
                        "solver": solver, "experts": t, "batch": b, "solve_ms": ms(solve, 3), "fuse_ms": ms(fuse_s, 3),
                        "static_fuse_ms": ms(static_s, 3), "step_ms": ms(median(steps)),
                        "solver_share": round(share, 4), "under_3pct": share < 0.03,
                        "solve_cpu_ms": ms(solve_cpu, 3), "step_cpu_ms": ms(step_cpu),
                        "share_cpu": round(solve_cpu / step_cpu, 4),
                        "solve_ms_v32000": ms(solve_s(big, experts, solver, reps), 2),
                    })
        finally:
            close_runners(runners)
    sec.notes += [
        f"solve/fuse at the family's V = {fam.vocab_size}; solve_ms_v32000 is the solver alone at V = "
        f"{cfg.solver_vocab}; fp32 on one CPU thread, median of {reps} after a warm-up",
        "solver_share = solve_ms / step_ms (the Decoder's steady step with that recipe, in process; each round times "
        "the solver alone then a Decoder run, the share is the median of per-round shares); share_cpu = the solver's "
        "thread CPU / the step's process CPU (all models' work): the same question asked of work, not time",
        "the step of these tiny CPU models is short, so the share here is far larger than next to a 7B model; on a "
        "GPU the Decoder currently fuses on the CPU (the runner contract returns CPU fp32 logits): see bench/gpu.py",
    ]
    return sec
