"""Sections d and e: fused throughput against the batch size, and the Decoder against the proxy-tuning reference loop.

d. fused tokens/s (DLF newton, one expert) and the large model alone through the same Decoder, batch 1..64.
e. the naive sequential three-model loop (``engine.reference.sequential_decode``: batch 1, each model in turn with
   its own past_key_values) against the Decoder, batch 1 and 16 (the loop runs the prompts one after another).
"""

from __future__ import annotations

from bench.common import Section, SuiteConfig, median, ms
from bench.drive import Arm, make_decoder, paired_rounds, random_prompts, run_decoder, sequential_loop
from bench.models import RandomFamily, close_runners
from logitfusion.fusion import presets

D_COLUMNS = ["batch", "fused_step_ms", "fused_tok_s", "large_alone_step_ms", "large_alone_tok_s", "fused_vs_alone",
             "fused_cpu_ms", "alone_cpu_ms"]
E_COLUMNS = ["batch", "loop_tok_s", "decoder_tok_s", "speedup", "identical", "loop_s", "decoder_s", "loop_cpu_s",
             "decoder_cpu_s", "speedup_cpu"]


def throughput_section(cfg: SuiteConfig, fam: RandomFamily) -> Section:
    sec = Section(key="", title="fused throughput against batch size (in process)", columns=D_COLUMNS)
    fused = presets.dlf("large", "small", ["expert_0"], solver="newton")
    alone = presets.single("large")
    runners = fam.runners(["large", "small", "expert_0"])
    w = cfg.warmup_steps
    try:
        for b in cfg.throughput_batches:
            decoder = make_decoder(runners, b)
            prompts = random_prompts(b, cfg.prompt_tokens, fam.vocab_size, seed=b)
            _, runs = paired_rounds({"fused": Arm(decoder, fused), "alone": Arm(decoder, alone)}, prompts,
                                    warmup_steps=w, measure_steps=cfg.measure_steps, repeats=cfg.repeats)
            f = median([r.steady_step_s(w) for r in runs["fused"]])
            a = median([r.steady_step_s(w) for r in runs["alone"]])
            ratio = median([y.steady_step_s(w) / x.steady_step_s(w) for x, y in zip(runs["fused"], runs["alone"])])
            sec.rows.append({
                "batch": b, "fused_step_ms": ms(f), "fused_tok_s": round(b / f, 1), "large_alone_step_ms": ms(a),
                "large_alone_tok_s": round(b / a, 1), "fused_vs_alone": round(ratio, 3),
                "fused_cpu_ms": ms(median([r.steady_cpu_s(w) for r in runs["fused"]])),
                "alone_cpu_ms": ms(median([r.steady_cpu_s(w) for r in runs["alone"]])),
            })
    finally:
        close_runners(runners)
    sec.notes += [
        "fused = DLF newton over large + small + 1 expert; large alone = recipe single(large) through the same Decoder",
        f"tok/s = batch / median steady step ({cfg.repeats} rounds x {cfg.measure_steps} steps after "
        f"{cfg.warmup_steps} warm-up; each round runs fused then alone back to back), prompts of "
        f"{cfg.prompt_tokens} random tokens, greedy",
        "fused_vs_alone = large-alone step / fused step (median of per-round ratios): the share of the large "
        "model's own speed that fusion keeps",
        "cpu_ms: mean CPU time of the process per steady step (all threads): the work, robust to the machine's load",
        "one torch thread per model on 2 shared cores: large batches are compute bound on the CPU, so tok/s flattens "
        "early; a GPU keeps scaling much further (memory-bound decode)",
    ]
    return sec


def baseline_section(cfg: SuiteConfig, fam: RandomFamily) -> Section:
    sec = Section(key="", title="Decoder vs the naive sequential three-model loop (proxy-tuning)", columns=E_COLUMNS)
    names = ["large", "small", "expert_0"]
    recipe = presets.proxy_tuning(*names)
    models = {n: fam.models[n] for n in names}
    runners = fam.runners(names)
    n_new = cfg.baseline_new_tokens
    try:
        for b in cfg.main_batches:
            prompts = random_prompts(b, cfg.prompt_tokens, fam.vocab_size, seed=100 + b)
            decoder = make_decoder(runners, b)
            run_decoder(decoder, recipe, prompts[:1], new_tokens=2, tag="warm")
            sequential_loop(models, recipe, prompts[:1], vocab_size=fam.vocab_size, new_tokens=2)
            reps = cfg.repeats if b == 1 else 1
            loop_s, dec_s, loop_cpu, dec_cpu, identical = [], [], [], [], True
            for r in range(reps):
                run = run_decoder(decoder, recipe, prompts, new_tokens=n_new, tag=f"b{b}-r{r}")
                t, outputs = sequential_loop(models, recipe, prompts, vocab_size=fam.vocab_size, new_tokens=n_new)
                dec_s.append(run.total_s)
                dec_cpu.append(run.total_cpu_s)
                loop_s.append(t.wall_s)
                loop_cpu.append(t.cpu_s)
                identical = identical and outputs == run.outputs
            tokens = b * n_new
            sec.rows.append({
                "batch": b, "loop_tok_s": round(tokens / median(loop_s), 1),
                "decoder_tok_s": round(tokens / median(dec_s), 1), "speedup": round(median(loop_s) / median(dec_s), 2),
                "identical": identical, "loop_s": round(median(loop_s), 3), "decoder_s": round(median(dec_s), 3),
                "loop_cpu_s": round(median(loop_cpu), 3), "decoder_cpu_s": round(median(dec_cpu), 3),
                "speedup_cpu": round(median(loop_cpu) / median(dec_cpu), 2),
            })
    finally:
        close_runners(runners)
    sec.notes += [
        f"end to end (prefill included): {n_new} new tokens per prompt of {cfg.prompt_tokens} tokens, greedy, "
        f"proxy-tuning over large + small + 1 expert; batch 1: median of {cfg.repeats}, batch > 1: one run each",
        "the loop serves batch B as B prompts one after another; the Decoder runs them as one batch with every "
        "model's forward in turn (LocalRunner's default: unthreaded; lean forward)",
        "identical: the Decoder's greedy tokens equal the loop's, prompt by prompt",
        "cpu_s: CPU time of the process over the whole run (all threads): the work each approach does",
    ]
    return sec
