"""How the sections drive the code under test: Decoder runs, a model's pure forward, the sequential reference loop.

A Decoder run adds every request, then steps until all are done, timing each step. The first step admits the
requests and prefills every model; the later ones are the steady decode steps the sections report (the final step
also frees the caches, so it is left out of the steady figures).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from bench.common import median
from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig
from logitfusion.engine.reference import sequential_decode
from logitfusion.engine.runner import ModelRunner
from logitfusion.fusion import Recipe


class Timing(NamedTuple):
    """A median in seconds: wall clock, and CPU time (the work, less sensitive to a shared machine's load)."""

    wall_s: float
    cpu_s: float


def random_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g).tolist()


@dataclass
class DecodeRun:
    """One Decoder run: every request to completion."""

    batch: int
    step_s: list[float] = field(default_factory=list)  # every step, the first (prefill) included
    step_cpu_s: list[float] = field(default_factory=list)  # CPU seconds per step (cpu_fn: this process by default)
    step_tokens: list[int] = field(default_factory=list)  # tokens emitted by each step
    drafted: int = 0
    accepted: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # per request, in order

    @property
    def total_s(self) -> float:
        return sum(self.step_s)

    @property
    def tokens(self) -> int:
        return sum(self.step_tokens)

    def steady(self, warmup_steps: int) -> tuple[list[float], list[int]]:
        """Step times and tokens after the prefill step and ``warmup_steps`` more, without the final step."""
        lo = 1 + warmup_steps
        hi = len(self.step_s) - 1 if len(self.step_s) - 1 > lo else len(self.step_s)
        return self.step_s[lo:hi], self.step_tokens[lo:hi]

    def steady_step_s(self, warmup_steps: int) -> float:
        return median(self.steady(warmup_steps)[0])

    def steady_cpu_s(self, warmup_steps: int) -> float:
        """Mean CPU seconds of the steady steps (CPU time adds up, so the mean is the work per step)."""
        lo = 1 + warmup_steps
        hi = len(self.step_cpu_s) - 1 if len(self.step_cpu_s) - 1 > lo else len(self.step_cpu_s)
        steady = self.step_cpu_s[lo:hi]
        return sum(steady) / len(steady) if steady else float("nan")

    @property
    def total_cpu_s(self) -> float:
        return sum(self.step_cpu_s)

    def end_to_end_tokens_per_s(self) -> float:
        """Every generated token over the whole run's wall time (prefill included)."""
        return self.tokens / self.total_s if self.total_s > 0 else float("nan")

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def run_decoder(
    decoder: Decoder,
    recipe: Recipe,
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int,
    tag: str,
    speculative: SpeculativeConfig | None = None,
    cpu_fn: Callable[[], float] = time.process_time,
) -> DecodeRun:
    """Run ``prompts`` as one batch of greedy requests (no stop token: every request makes ``new_tokens``).

    cpu_fn: CPU seconds so far of every process doing the work (this process by default; add the workers' for a
    distributed run)."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    requests = [
        GenerationRequest(
            request_id=rid,
            prompt_ids=list(prompt),
            recipe=recipe,
            max_new_tokens=new_tokens,
            stop_token_ids=(),
            speculative=speculative,
        )
        for rid, prompt in zip(ids, prompts)
    ]
    run = DecodeRun(batch=len(prompts))
    clock = [time.perf_counter(), cpu_fn()]  # when the step that on_step sees began

    def on_step(events: list) -> None:
        t, c = time.perf_counter(), cpu_fn()
        run.step_s.append(t - clock[0])
        run.step_cpu_s.append(c - clock[1])
        run.step_tokens.append(sum(1 for e in events if e.token_id is not None))
        clock[:] = [time.perf_counter(), cpu_fn()]  # the loop's own bookkeeping is not a step's

    results = {}
    for res in decoder.run(requests, on_step=on_step):
        if res.error:
            raise RuntimeError(f"request {res.request_id} was refused: {res.error}")
        results[res.request_id] = res
    for rid in ids:
        res = results[rid]
        run.outputs.append(res.token_ids)
        run.drafted += res.num_drafted_tokens
        run.accepted += res.num_accepted_tokens
    return run


def make_decoder(runners: Mapping[str, ModelRunner], max_batch_size: int, fusion_device: str = "cpu") -> Decoder:
    return Decoder(runners, max_batch_size=max(1, max_batch_size), max_new_tokens_limit=4096,
                   fusion_device=fusion_device)


def steady_step(
    runners: Mapping[str, ModelRunner],
    recipe: Recipe,
    batch: int,
    *,
    prompt_tokens: int,
    vocab_size: int,
    warmup_steps: int,
    measure_steps: int,
    repeats: int,
    prompts: Sequence[Sequence[int]] | None = None,
    fusion_device: str = "cpu",
) -> tuple[Timing, list[DecodeRun]]:
    """Median steady decode step of ``batch`` requests over ``repeats`` runs (after one warm-up run): wall seconds,
    and CPU seconds of this process (every thread: in-process runners' forwards included)."""
    decoder = make_decoder(runners, batch, fusion_device)
    if prompts is None:
        prompts = random_prompts(batch, prompt_tokens, vocab_size, seed=batch)
    prompts = [list(prompts[i % len(prompts)]) for i in range(batch)]
    new_tokens = 1 + warmup_steps + measure_steps + 1  # prefill step, warm-up, timed steps, final step
    run_decoder(decoder, recipe, prompts, new_tokens=2, tag="warm")
    runs = [run_decoder(decoder, recipe, prompts, new_tokens=new_tokens, tag=f"r{r}") for r in range(repeats)]
    wall = median([r.steady_step_s(warmup_steps) for r in runs])
    return Timing(wall, median([r.steady_cpu_s(warmup_steps) for r in runs])), runs


@dataclass
class Arm:
    """One thing a paired measurement compares: a Decoder, the recipe it runs and the CPU clock of its work."""

    decoder: Decoder
    recipe: Recipe
    cpu_fn: Callable[[], float] = time.process_time


def paired_rounds(
    arms: Mapping[str, Arm],
    prompts: Sequence[Sequence[int]],
    *,
    warmup_steps: int,
    measure_steps: int,
    repeats: int,
    before_each: Callable[[], Any] = lambda: None,
) -> tuple[list[Any], dict[str, list[DecodeRun]]]:
    """``repeats`` rounds; each calls ``before_each`` and then runs every arm once, back to back, so a drifting
    machine load hits every arm of a round alike (compare per-round ratios). One untimed warm-up run per arm first.
    Returns what ``before_each`` gave per round and each arm's runs."""
    new_tokens = 1 + warmup_steps + measure_steps + 1  # prefill step, warm-up, timed steps, final step
    for label, a in arms.items():
        run_decoder(a.decoder, a.recipe, prompts, new_tokens=2, tag=f"warm-{label}", cpu_fn=a.cpu_fn)
    pre: list[Any] = []
    runs: dict[str, list[DecodeRun]] = {label: [] for label in arms}
    for r in range(repeats):
        pre.append(before_each())
        for label, a in arms.items():
            runs[label].append(run_decoder(a.decoder, a.recipe, prompts, new_tokens=new_tokens, tag=f"{label}-{r}",
                                           cpu_fn=a.cpu_fn))
    return pre, runs


# ----------------------------------------------------------------------------------------------------- pure forward


@torch.inference_mode()
def pure_forward_s(
    model: Any,
    batch: int,
    *,
    start_tokens: int,
    warmup: int,
    steps: int,
    vocab_size: int,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Median seconds (wall, and this thread's CPU) of one single-token forward of ``model`` alone (no runner), at
    ``batch`` rows whose cache grows from ``start_tokens`` + ``warmup`` tokens, as the Decoder's timed steps see it."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(batch)
    cache = DynamicCache()
    prompt = torch.randint(0, vocab_size, (batch, start_tokens), generator=g).to(device)  # [B, L]
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    times, cpu = [], []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab_size, (batch, 1), generator=g).to(device)  # [B, 1]
        if sync:
            sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if sync:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    return Timing(median(times), median(cpu))


# ----------------------------------------------------------------------------------------------------- the baseline


def sequential_loop(
    models: Mapping[str, Any], recipe: Recipe, prompts: Sequence[Sequence[int]], *, vocab_size: int, new_tokens: int
) -> tuple[Timing, list[list[int]]]:
    """The proxy-tuning reference loop over ``prompts`` one after another: (wall and CPU seconds, outputs)."""
    outputs = []
    t0, c0 = time.perf_counter(), time.process_time()
    for prompt in prompts:
        out = sequential_decode(models, list(prompt), recipe, vocab_size=vocab_size, max_new_tokens=new_tokens)
        outputs.append(out.token_ids)
    return Timing(time.perf_counter() - t0, time.process_time() - c0), outputs
