"""Section a: speculative vs plain fused decoding (greedy, batch 1), with the acceptance rate.

Three model sets:
- random: the random family. A random draft agrees with the fused target about as often as chance, so this is
  the cost of speculation when it fails (acceptance ~ 0).
- agreeing: the same models, but the large and small bases have a zero output layer (a uniform distribution), so
  l_L - l_S is constant and the fused target is the expert's own distribution: the draft (that expert) is always
  accepted. Same forward costs as "random": this bounds the speedup from above.
- zoo: trained models whose small expert really agrees with the fused target on its task most of the time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import Section, SuiteConfig, median, ms
from bench.drive import DecodeRun, Timing, make_decoder, pure_forward_s, random_prompts, run_decoder
from bench.models import RandomFamily, Zoo, close_runners, flat_head_copy, random_runner
from logitfusion.engine.decoder import SpeculativeConfig
from logitfusion.fusion import Recipe, presets

COLUMNS = [
    "models", "recipe", "draft", "k", "large_fwd_ms", "draft_fwd_ms", "fwd_ratio", "fwd_ratio_cpu", "plain_tok_s",
    "spec_tok_s", "speedup", "speedup_cpu", "acceptance", "tokens_per_spec_step", "identical",
]


@dataclass
class ModelSet:
    label: str
    runners: Callable[[], dict[str, Any]]  # fresh runners for every model the recipes read
    large_model: Any
    draft_model: Any
    draft: str
    recipes: list[Recipe]
    prompts: list[list[int]]
    vocab_size: int


def _recipes(large: str, small: str, expert: str) -> list[Recipe]:
    return [presets.proxy_tuning(large, small, expert), presets.dlf(large, small, [expert], solver="newton")]


def _measure(cfg: SuiteConfig, ms_: ModelSet, recipe: Recipe) -> dict[str, Any]:
    runners = ms_.runners()
    try:
        decoder = make_decoder(runners, 1)
        spec = SpeculativeConfig(draft_model=ms_.draft, num_draft_tokens=cfg.spec_draft_tokens)
        warm = ms_.prompts[:1]
        run_decoder(decoder, recipe, warm, new_tokens=4, tag="warm-plain")
        run_decoder(decoder, recipe, warm, new_tokens=4, tag="warm-spec", speculative=spec)
        plain_rates, spec_rates, cpu_ratios = [], [], []
        plain_out: list[list[int]] = []
        spec_out: list[list[int]] = []
        spec_runs: list[DecodeRun] = []
        for r in range(cfg.spec_repeats):
            p_tok = p_s = s_tok = s_s = p_cpu = s_cpu = 0.0
            for i, prompt in enumerate(ms_.prompts):  # batch 1, one request after another, interleaved
                p = run_decoder(decoder, recipe, [prompt], new_tokens=cfg.spec_new_tokens, tag=f"p{r}-{i}")
                s = run_decoder(decoder, recipe, [prompt], new_tokens=cfg.spec_new_tokens, tag=f"s{r}-{i}",
                                speculative=spec)
                p_tok, p_s, p_cpu = p_tok + p.tokens, p_s + p.total_s, p_cpu + p.total_cpu_s
                s_tok, s_s, s_cpu = s_tok + s.tokens, s_s + s.total_s, s_cpu + s.total_cpu_s
                if r == 0:
                    plain_out += p.outputs
                    spec_out += s.outputs
                    spec_runs.append(s)
            plain_rates.append(p_tok / p_s)
            spec_rates.append(s_tok / s_s)
            cpu_ratios.append((p_cpu / p_tok) / (s_cpu / s_tok))  # CPU per token, plain over speculative
    finally:
        close_runners(runners)
    drafted = sum(r.drafted for r in spec_runs)
    accepted = sum(r.accepted for r in spec_runs)
    spec_steps = sum(len(r.step_s) for r in spec_runs)
    plain, sped = median(plain_rates), median(spec_rates)
    return {
        "recipe": recipe.method if recipe.solver is None else f"dlf-{recipe.solver}",
        "plain_tok_s": round(plain, 1),
        "spec_tok_s": round(sped, 1),
        "speedup": round(sped / plain, 2),
        "speedup_cpu": round(median(cpu_ratios), 2),
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "tokens_per_spec_step": round(sum(len(o) for o in spec_out) / spec_steps, 2),
        "identical": plain_out == spec_out,
    }


def _forward(cfg: SuiteConfig, model: Any, vocab_size: int, prompt_len: int) -> Timing:
    return pure_forward_s(model, 1, start_tokens=prompt_len + 1, warmup=cfg.warmup_steps,
                          steps=max(cfg.measure_steps, 8), vocab_size=vocab_size)


def _random_sets(cfg: SuiteConfig, fam: RandomFamily) -> list[ModelSet]:
    prompts = random_prompts(cfg.spec_prompts, cfg.prompt_tokens, fam.vocab_size, seed=7)
    names = ["large", "small", "expert_0"]
    flat = {"large": flat_head_copy(fam.models["large"]), "small": flat_head_copy(fam.models["small"])}

    def agreeing() -> dict[str, Any]:
        out = {n: random_runner(n, fam.sizes[n], model=flat[n]) for n in flat}
        out["expert_0"] = random_runner("expert_0", fam.sizes["expert_0"], model=fam.models["expert_0"])
        return out

    common = dict(large_model=fam.models["large"], draft_model=fam.models["expert_0"], draft="expert_0",
                  recipes=_recipes(*names), prompts=prompts, vocab_size=fam.vocab_size)
    return [
        ModelSet(label="random", runners=lambda: fam.runners(names), **common),
        ModelSet(label="agreeing (flat L, S heads)", runners=agreeing, **common),
    ]


def _zoo_set(cfg: SuiteConfig, zoo: Zoo) -> ModelSet:
    task = "capital"
    expert = f"expert_{task}"
    names = ["large", "small", expert]
    return ModelSet(label=f"zoo ({task})", runners=lambda: zoo.runners(names), large_model=zoo.loaded("large").model,
                    draft_model=zoo.loaded(expert).model, draft=expert, recipes=_recipes(*names),
                    prompts=zoo.prompts(task, cfg.spec_prompts), vocab_size=zoo.vocab_size)


def speculative_section(cfg: SuiteConfig, fam: RandomFamily, zoo: Zoo | None, zoo_why: str) -> Section:
    sec = Section(key="", title="speculative vs plain fused decoding (greedy, batch 1)", columns=COLUMNS)
    sets = _random_sets(cfg, fam)
    if cfg.zoo and zoo is not None:
        sets.append(_zoo_set(cfg, zoo))
    else:
        sec.skipped.append(f"zoo rows: {zoo_why or 'disabled'}")
    forwards: dict[tuple[int, int], tuple[Timing, Timing]] = {}  # the same models are timed once
    for s in sets:
        key = (id(s.large_model), id(s.draft_model))
        if key not in forwards:
            prompt_len = len(s.prompts[0])
            forwards[key] = (_forward(cfg, s.large_model, s.vocab_size, prompt_len),
                             _forward(cfg, s.draft_model, s.vocab_size, prompt_len))
        large, draft = forwards[key]
        for recipe in s.recipes:
            row = {"models": s.label, "draft": s.draft, "k": cfg.spec_draft_tokens, "large_fwd_ms": ms(large.wall_s),
                   "draft_fwd_ms": ms(draft.wall_s), "fwd_ratio": round(large.wall_s / draft.wall_s, 2),
                   "fwd_ratio_cpu": round(large.cpu_s / draft.cpu_s, 2)}
            row.update(_measure(cfg, s, recipe))
            sec.rows.append(row)
    sec.notes += [
        "tokens/s are end to end per request (prefill included), batch 1, requests one after another, "
        f"{cfg.spec_new_tokens} new tokens each, no stop token; median of {cfg.spec_repeats} repeats",
        "fwd_ms: the large model's and the draft's pure forward alone (one token, batch 1, same cache length); "
        "fwd_ratio (wall) and fwd_ratio_cpu (thread CPU time, robust to the machine's load) bound what speculation "
        "can win per accepted token",
        "speedup_cpu: CPU time per token of this process (all threads), plain over speculative: the work saved, "
        "less sensitive to load than the wall-clock speedup",
        "random: acceptance ~ 0 by construction (independent random models): the pure cost of failed drafts",
        "agreeing: large and small bases with a zero output layer, so the fused target IS the expert's distribution "
        "and every draft is accepted; same forward costs as random: the upper bound of the speedup",
        "identical: greedy speculative output equals plain fused output token for token (docs/algorithms.md §8)",
        "on 2 shared CPU cores the small models' forwards are mostly Python overhead, so the draft is relatively "
        "expensive (a real 1B draft of a 7B target is ~1/7 of its cost on a GPU)",
    ]
    return sec
