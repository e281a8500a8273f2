"""Tensor-parallel step time on this machine: the model in-process (LocalRunner) vs TensorParallelRunner with
tp_size 1 (the Ray actor hop alone) and tp_size 2 (DeepSpeed AutoTP over 2 shard actors), plus the largest logits
difference between tp_size 2 and the unsharded model.

The runners are stepped alternately with the same plans, so machine load hits all of them alike. Prints JSON (one
line per runner) and a table. Run:
  OMP_NUM_THREADS=1 .venv/bin/python -m bench.tp_step [--model-dir DIR | --hidden 64 --layers 2 --heads 4] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import torch

from logitfusion.actors.tp import TensorParallelRunner, TPConfig
from logitfusion.engine.local import LocalRunner
from logitfusion.engine.runner import ExtendOp, StepPlan


def random_llama_dir(out: Path, hidden: int, layers: int, heads: int, vocab: int) -> Path:
    """A random Llama with a WordLevel tokenizer of ``vocab`` tokens, saved in the Hugging Face layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=(vocab + 31) // 32 * 32,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def bench(model_dir: str, batch: int, prompt_tokens: int, steps: int) -> list[dict]:
    runners = {
        "local": LocalRunner.from_pretrained(model_dir, "m", threaded=False),
        "tp1": TensorParallelRunner(TPConfig(model_dir=model_dir, name="m", tp_size=1, device="cpu")),
        "tp2": TensorParallelRunner(TPConfig(model_dir=model_dir, name="m", tp_size=2, device="cpu")),
    }
    try:
        vocab = runners["local"].describe().vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(4, vocab, (prompt_tokens + i,), generator=g).tolist() for i in range(batch)]
        prefill = StepPlan(extends=tuple(ExtendOp(str(i), tuple(p)) for i, p in enumerate(prompts)))
        wall: dict[str, list[float]] = {k: [] for k in runners}
        prefill_s: dict[str, float] = {}
        worst = 0.0
        outs = {}
        for name, runner in runners.items():
            t0 = time.perf_counter()
            outs[name] = runner.step(prefill)
            prefill_s[name] = time.perf_counter() - t0
        worst = max(float((a - b).abs().max()) for a, b in zip(outs["tp2"], outs["local"]))
        for _ in range(steps):
            # every runner gets the local model's greedy tokens, so all hold identical sequences
            tokens = [int(o[-1].argmax()) for o in outs["local"]]
            plan = StepPlan(extends=tuple(ExtendOp(str(i), (t,)) for i, t in enumerate(tokens)))
            for name, runner in runners.items():
                t0 = time.perf_counter()
                outs[name] = runner.step(plan)
                wall[name].append(time.perf_counter() - t0)
            worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(outs["tp2"], outs["local"])))
        info = runners["local"].describe()
        return [
            {
                "runner": name,
                "num_parameters": info.num_parameters,
                "batch": batch,
                "prompt_tokens": prompt_tokens,
                "prefill_ms": round(prefill_s[name] * 1e3, 2),
                "decode_step_ms_median": round(statistics.median(wall[name]) * 1e3, 3),
                "decode_step_ms_p90": round(sorted(wall[name])[int(0.9 * (len(wall[name]) - 1))] * 1e3, 3),
                "max_abs_logits_diff_tp2_vs_local": worst,
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            for name in runners
        ]
    finally:
        for runner in runners.values():
            runner.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None, help="a local HF directory (default: a random Llama)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ray

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # token auth on, nothing written to ~/.ray
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model_dir or str(
                random_llama_dir(Path(tmp) / "m", args.hidden, args.layers, args.heads, args.vocab)
            )
            rows = bench(model_dir, args.batch, args.prompt_tokens, args.steps)
    finally:
        ray.shutdown()
    for row in rows:
        print(json.dumps(row))
    print(f"{'runner':8} {'params':>10} {'batch':>5} {'prefill ms':>11} {'step ms p50':>12} {'step ms p90':>12}")
    for r in rows:
        print(
            f"{r['runner']:8} {r['num_parameters']:>10} {r['batch']:>5} {r['prefill_ms']:>11} "
            f"{r['decode_step_ms_median']:>12} {r['decode_step_ms_p90']:>12}"
        )
    print(f"max abs logits diff tp2 vs local: {rows[0]['max_abs_logits_diff_tp2_vs_local']:.3g}")


if __name__ == "__main__":
    main()
