"""Fused decoding throughput: the proxy-tuning style sequential loop vs the Decoder at batch 1 and batch B.

Random Llama models (sizes below; decoding speed does not depend on the weights' values) sharing one vocabulary.
Prints one JSON line per configuration and a table. Run:
  OMP_NUM_THREADS=1 .venv/bin/python -m bench.engine_decoder [--recipe dlf_newton --batch 16 --tokens 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig
from logitfusion.engine.local import LocalRunner
from logitfusion.engine.reference import sequential_decode
from logitfusion.engine.testing import TINY_FINGERPRINT, TINY_VOCAB_SIZE, TinySpec, tiny_llama
from logitfusion.fusion import presets

SIZES = {
    "large": TinySpec(seed=1, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024,
                      max_length_tokens=2048, init_range=0.05),
    "small": TinySpec(seed=2, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                      max_length_tokens=2048, init_range=0.05),
    "expert_a": TinySpec(seed=3, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                         max_length_tokens=2048, init_range=0.05),
    "expert_b": TinySpec(seed=4, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                         max_length_tokens=2048, init_range=0.05),
}
RECIPES = {
    "proxy": presets.proxy_tuning("large", "small", "expert_a"),
    "dlf_newton": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="newton"),
    "dlf_grid": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="grid"),
}


def prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, TINY_VOCAB_SIZE, (length + i % 5,), generator=g).tolist() for i in range(n)]


def bench_sequential(models, recipe, ps, tokens: int) -> dict:
    t0 = time.perf_counter()
    n = 0
    for p in ps:
        n += len(sequential_decode(models, p, recipe, vocab_size=TINY_VOCAB_SIZE, max_new_tokens=tokens).token_ids)
    dt = time.perf_counter() - t0
    return {"mode": "sequential (batch 1)", "batch": 1, "tokens": n, "seconds": round(dt, 3),
            "tokens_per_s": round(n / dt, 1)}


def bench_decoder(models, recipe, ps, tokens: int, batch: int, threaded: bool, spec: SpeculativeConfig | None) -> dict:
    runners = {n: LocalRunner(m, name=n, vocab_size=TINY_VOCAB_SIZE, vocab_fingerprint=TINY_FINGERPRINT,
                              threaded=threaded) for n, m in models.items()}
    dec = Decoder(runners, max_batch_size=batch, max_new_tokens_limit=tokens)
    reqs = [GenerationRequest(f"r{i}", p, recipe, max_new_tokens=tokens, stop_token_ids=(), speculative=spec)
            for i, p in enumerate(ps)]
    t0 = time.perf_counter()
    results = dec.generate(reqs)
    dt = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in results)
    steps = dec._step
    drafted = sum(r.num_drafted_tokens for r in results)
    out = {"mode": f"decoder{' speculative k=%d' % spec.num_draft_tokens if spec else ''}"
                   f"{' threaded' if threaded else ''}",
           "batch": batch, "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1),
           "step_ms": round(dt / steps * 1e3, 2)}
    if spec:
        out["acceptance_rate"] = round(sum(r.num_accepted_tokens for r in results) / max(drafted, 1), 3)
    for r in runners.values():
        r.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="dlf_newton", choices=sorted(RECIPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    a = ap.parse_args()
    torch.set_num_threads(1)
    models = {n: tiny_llama(s) for n, s in SIZES.items()}
    recipe = RECIPES[a.recipe]
    rows = [
        bench_sequential(models, recipe, prompts(4, a.prompt_tokens), a.tokens),
        bench_decoder(models, recipe, prompts(4, a.prompt_tokens), a.tokens, 1, False, None),
        bench_decoder(models, recipe, prompts(4, a.prompt_tokens), a.tokens, 1, True, None),
        bench_decoder(models, recipe, prompts(a.batch, a.prompt_tokens), a.tokens, a.batch, False, None),
        bench_decoder(models, recipe, prompts(a.batch, a.prompt_tokens), a.tokens, a.batch, True, None),
        bench_decoder(models, recipe, prompts(a.batch, a.prompt_tokens), a.tokens, a.batch, True,
                      SpeculativeConfig("expert_a", 3)),
    ]
    for r in rows:
        r["recipe"] = a.recipe
        print(json.dumps(r))
    print(f"{'mode':<34} {'batch':>5} {'tok/s':>8} {'step ms':>8} {'accept':>7}")
    for r in rows:
        print(f"{r['mode']:<34} {r['batch']:>5} {r['tokens_per_s']:>8} {r.get('step_ms', ''):>8} "
              f"{r.get('acceptance_rate', ''):>7}")


if __name__ == "__main__":
    main()
