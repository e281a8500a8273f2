"""LocalRunner decode step time: batch 1 vs B, with and without keeping the decode group's padded batch.

Section g of the suite (``pack_section``), and a stand-alone run that prints JSON (one line per configuration) and
a table:
  OMP_NUM_THREADS=1 .venv/bin/python -m bench.engine_local [--hidden 256 --layers 4 --steps 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from logitfusion.engine.local import LocalRunner
from logitfusion.engine.runner import ExtendOp, StepPlan
from logitfusion.engine.testing import TINY_FINGERPRINT, TINY_VOCAB_SIZE, TinySpec, tiny_llama


def run(model, batch: int, prompt_tokens: int, steps: int) -> list[dict]:
    """Two runners (pack kept / re-padded every step) stepped alternately, so machine load hits both alike."""
    runners = {
        reuse: LocalRunner(model, name="m", vocab_size=TINY_VOCAB_SIZE, vocab_fingerprint=TINY_FINGERPRINT,
                           threaded=False, reuse_pack=reuse)
        for reuse in (True, False)
    }
    g = torch.Generator().manual_seed(0)
    # prompts of different lengths, so the batch is really padded
    prompts = [torch.randint(0, TINY_VOCAB_SIZE, (prompt_tokens + i % 7,), generator=g).tolist() for i in range(batch)]
    out = {r: x.step(StepPlan(extends=tuple(ExtendOp(str(i), tuple(p)) for i, p in enumerate(prompts))))
           for r, x in runners.items()}
    wall: dict[bool, list[float]] = {r: [] for r in runners}
    cpu: dict[bool, list[float]] = {r: [] for r in runners}
    for _ in range(steps):
        for reuse, runner in runners.items():
            plan = StepPlan(extends=tuple(ExtendOp(str(i), (int(o[-1].argmax()),)) for i, o in enumerate(out[reuse])))
            t0, c0 = time.perf_counter(), time.thread_time()
            out[reuse] = runner.step(plan)
            wall[reuse].append(time.perf_counter() - t0)
            cpu[reuse].append(time.thread_time() - c0)
    rows = []
    for reuse, runner in runners.items():
        med, med_cpu = statistics.median(wall[reuse]), statistics.median(cpu[reuse])
        rows.append({
            "batch": batch,
            "reuse_pack": reuse,
            "step_ms_median": round(med * 1e3, 3),
            "step_cpu_ms_median": round(med_cpu * 1e3, 3),
            "per_sequence_cpu_ms": round(med_cpu * 1e3 / batch, 3),
            "tokens_per_cpu_s": round(batch / med_cpu, 1),
        })
        runner.close()
    return rows


PACK_COLUMNS = ["batch", "reuse_pack", "step_ms_median", "step_cpu_ms_median", "per_sequence_cpu_ms", "tokens_per_cpu_s"]


def pack_section(cfg):
    """Section g: the runner alone (no Decoder, no fusion), its decode pack kept vs re-padded every step."""
    from bench.common import Section

    sec = Section(key="", title="LocalRunner step: decode pack kept vs re-padded", columns=PACK_COLUMNS)
    hidden, layers = (64, 2) if cfg.quick else (256, 4)
    spec = TinySpec(seed=0, hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=4,
                    intermediate_size=4 * hidden, max_length_tokens=1024)
    model = tiny_llama(spec)
    for b in cfg.pack_batches:
        sec.rows += run(model, b, cfg.prompt_tokens, cfg.pack_steps)
    sec.notes += [
        f"one LocalRunner over a random {layers}-layer width-{hidden} Llama (V={TINY_VOCAB_SIZE}), prompts of "
        f"{cfg.prompt_tokens}..{cfg.prompt_tokens + 6} tokens (so rows are really padded), {cfg.pack_steps} steps; "
        "both runners stepped alternately so machine load hits both alike",
        "cpu ms is the thread's CPU time (less sensitive to the shared machine's load than wall time)",
    ]
    return sec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batches", default="1,4,16")
    a = ap.parse_args()
    torch.set_num_threads(1)
    spec = TinySpec(seed=0, hidden_size=a.hidden, num_layers=a.layers, num_heads=8, num_kv_heads=4,
                    intermediate_size=4 * a.hidden, max_length_tokens=1024)
    model = tiny_llama(spec)
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        for r in run(model, b, a.prompt_tokens, a.steps):
            r.update(hidden=a.hidden, layers=a.layers, prompt_tokens=a.prompt_tokens, steps=a.steps)
            print(json.dumps(r))
            rows.append(r)
    print(f"{'batch':>5} {'reuse_pack':>10} {'wall ms':>8} {'cpu ms':>8} {'cpu ms/seq':>10} {'tok/cpu-s':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {str(r['reuse_pack']):>10} {r['step_ms_median']:>8} {r['step_cpu_ms_median']:>8} "
              f"{r['per_sequence_cpu_ms']:>10} {r['tokens_per_cpu_s']:>9}")


if __name__ == "__main__":
    main()
