"""GPU benchmark: fused decoding of realistic Llama sizes in bf16, randomly initialised on the GPU (no downloads).

    python -m bench.gpu                      # Llama-2-7B-sized large, 1 TinyLlama-1.1B-sized small + 2 experts
    python -m bench.gpu --large 7b,13b       # also a Llama-2-13B-sized large
    python -m bench.gpu --tiny               # tiny models on the CPU: checks every code path in seconds

Measures, per large model: every model's pure forward; the large model alone and fused (static and DLF newton, 1
and 2 experts) through the Decoder with LocalRunners, batch 1 and 16; speculative fused decoding (draft = an expert,
with random heads: acceptance ~ 0, and with the bases' heads zeroed so the fused target is the draft's own
distribution: acceptance 1); the DLF solver's cost on the CPU (the Decoder's default: the runner contract returns CPU
fp32 logits) and on the GPU, and the DLF rows again with `Decoder(fusion_device=...)` (recipe "… @cuda"); and the
memory-bandwidth floor of a step: the bytes of every weight (and KV
cache) read once / the HBM bandwidth measured here with a large device-to-device copy.

Writes gpu.json and gpu.md to $OUT (or --out) when set, and prints the tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import markdown_table, median, ms
from bench.drive import make_decoder, pure_forward_s, random_prompts, run_decoder, steady_step
from bench.models import LLAMA2_7B, LLAMA2_13B, TINY_LARGE, TINY_SMALL, TINYLLAMA_1B, LlamaSize, build_llama, random_runner

logger = logging.getLogger("bench.gpu")

LARGES = {"7b": LLAMA2_7B, "13b": LLAMA2_13B}


@dataclass(frozen=True)
class GpuConfig:
    larges: tuple[tuple[str, LlamaSize], ...] = (("llama2-7b", LLAMA2_7B),)
    small: LlamaSize = TINYLLAMA_1B
    num_experts: int = 2
    batches: tuple[int, ...] = (1, 16)
    prompt_tokens: int = 128
    warmup_steps: int = 3
    measure_steps: int = 16
    repeats: int = 2
    spec_new_tokens: int = 32
    spec_prompts: int = 2
    spec_k: int = 4
    device: str = "cuda"
    dtype: str = "bfloat16"
    fuse_threads: int = 8  # torch CPU threads: the Decoder fuses on the CPU
    copy_bytes: int = 2 << 30  # the bandwidth probe's buffer

    @classmethod
    def tiny(cls) -> GpuConfig:
        return cls(larges=(("tiny", replace(TINY_LARGE, vocab_size=2048)),), small=replace(TINY_SMALL, vocab_size=2048),
                   batches=(1, 4), prompt_tokens=8, warmup_steps=1, measure_steps=3, repeats=1, spec_new_tokens=8,
                   spec_prompts=1, device="cpu", dtype="float32", fuse_threads=1, copy_bytes=16 << 20)


@dataclass
class Tables:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    on_add: Any = None  # called after every row (writes the JSON so far)

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(table, []).append(row)
        logger.info("%s: %s", table, row)
        if self.on_add is not None:
            self.on_add()


COLUMNS = {
    "forward": ["large", "model", "params_m", "batch", "fwd_ms"],
    "decode": ["large", "recipe", "models", "batch", "step_ms", "tok_s", "floor_ms", "of_floor", "fwd_large_ms",
               "fwd_sum_ms"],
    "speculative": ["large", "recipe", "heads", "plain_tok_s", "spec_tok_s", "speedup", "acceptance", "identical"],
    "solver": ["large", "solver", "experts", "batch", "cpu_solve_ms", "gpu_solve_ms", "cpu_fuse_ms", "gpu_fuse_ms",
               "step_ms", "cpu_share", "gpu_share_of_step"],
}


def _sync(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else None


def measure_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written (median of 20)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = _sync(device)
    times = []
    for i in range(25):
        if sync:
            sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        if sync:
            sync()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / median(times)


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(size: LlamaSize, batch: int, length: int, itemsize: int) -> int:
    """Bytes of the KV cache a step reads: keys and values of every layer."""
    head_dim = size.hidden_size // size.num_heads
    return 2 * size.num_layers * size.num_kv_heads * head_dim * length * batch * itemsize


def recipes(num_experts: int) -> dict[str, Any]:
    from logitfusion.fusion import presets

    out = {"large alone": presets.single("large"), "static-1": presets.proxy_tuning("large", "small", "expert_0"),
           "dlf-newton-1": presets.dlf("large", "small", ["expert_0"], solver="newton")}
    if num_experts >= 2:
        ex = [f"expert_{t}" for t in range(num_experts)]
        out["static-2"] = presets.static("large", "small", ex)
        out["dlf-newton-2"] = presets.dlf("large", "small", ex, solver="newton")
    return out


def run_large(cfg: GpuConfig, label: str, large: LlamaSize, bandwidth: float, tables: Tables) -> None:
    dtype = getattr(torch, cfg.dtype)
    sync = _sync(cfg.device)
    sizes = {"large": replace(large, seed=1), "small": replace(cfg.small, seed=2)}
    for t in range(cfg.num_experts):
        sizes[f"expert_{t}"] = replace(cfg.small, seed=10 + t)
    t0 = time.perf_counter()
    models = {n: build_llama(s, dtype=dtype, device=cfg.device) for n, s in sizes.items()}
    logger.info("%s: models built in %.1f s", label, time.perf_counter() - t0)
    runners = {n: random_runner(n, sizes[n], model=models[n], dtype=cfg.dtype, device=cfg.device) for n in models}
    V = large.vocab_size
    wbytes = {n: weight_bytes(m) for n, m in models.items()}
    fwd: dict[tuple[str, int], float] = {}
    start = cfg.prompt_tokens + 1
    for b in cfg.batches:
        for n, m in models.items():
            if n.startswith("expert_") and n != "expert_0":
                fwd[(n, b)] = fwd[("expert_0", b)]  # same size as expert_0
                continue
            fwd[(n, b)] = pure_forward_s(m, b, start_tokens=start, warmup=cfg.warmup_steps, steps=cfg.measure_steps,
                                         vocab_size=V, sync=sync).wall_s
            tables.add("forward", {"large": label, "model": n, "params_m": round(wbytes[n] / dtype.itemsize / 1e6, 1),
                                   "batch": b, "fwd_ms": ms(fwd[(n, b)])})
    common = dict(prompt_tokens=cfg.prompt_tokens, vocab_size=V, warmup_steps=cfg.warmup_steps,
                  measure_steps=cfg.measure_steps, repeats=cfg.repeats)
    steps: dict[tuple[str, int], float] = {}
    length = cfg.prompt_tokens + 1 + cfg.warmup_steps + cfg.measure_steps // 2  # mean cache length of a timed step
    arms = [(name, recipe, "cpu") for name, recipe in recipes(cfg.num_experts).items()]
    # the same DLF recipes with fusion and the solve on the models' device (Decoder(fusion_device=...))
    arms += [(f"{name} @{cfg.device}", recipe, cfg.device) for name, recipe, _ in list(arms) if recipe.solver]
    for name, recipe, fusion_device in arms:
        read = recipe.model_names()
        for b in cfg.batches:
            step = steady_step(runners, recipe, b, fusion_device=fusion_device, **common)[0].wall_s
            steps[(name, b)] = step
            floor = sum(wbytes[n] + kv_bytes(sizes[n], b, length, dtype.itemsize) for n in read) / bandwidth
            tables.add("decode", {
                "large": label, "recipe": name, "models": len(read), "batch": b, "step_ms": ms(step),
                "tok_s": round(b / step, 1), "floor_ms": ms(floor), "of_floor": round(floor / step, 3),
                "fwd_large_ms": ms(fwd[("large", b)]), "fwd_sum_ms": ms(sum(fwd[(n, b)] for n in read)),
            })
    solver_rows(cfg, label, runners, steps, tables)
    speculative_rows(cfg, label, runners, models, "random", tables)
    with torch.no_grad():  # the bases' heads zeroed: the fused target becomes the draft's own distribution
        for n in ("large", "small"):
            models[n].get_output_embeddings().weight.zero_()
    speculative_rows(cfg, label, runners, models, "flat L, S heads", tables)
    for r in runners.values():
        r.close()
    del runners, models
    gc.collect()
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()


def solver_rows(cfg: GpuConfig, label: str, runners: dict[str, Any], steps: dict, tables: Tables) -> None:
    """The DLF solver on the CPU (as the Decoder runs it) and on the GPU, against the step of that recipe."""
    from bench.solver_share import random_logits
    from logitfusion.fusion import SOLVERS, fuse, presets
    from logitfusion.fusion.dlf import problem_from_log_probs, solve_problem

    V = runners["large"].describe().vocab_size
    sync = _sync(cfg.device)
    for t in sorted({1, cfg.num_experts}):
        experts = [f"expert_{i}" for i in range(t)]
        names = ["large", "small", *experts]
        for b in cfg.batches:
            cpu = random_logits(names, b, V)
            dev = {n: x.to(cfg.device) for n, x in cpu.items()}
            for solver in SOLVERS:
                recipe = presets.dlf("large", "small", experts, solver=solver)
                key = (f"dlf-newton-{t}", b)
                if solver == "newton" and key in steps:
                    step = steps[key]
                else:
                    step = steady_step(runners, recipe, b, prompt_tokens=cfg.prompt_tokens, vocab_size=V,
                                       warmup_steps=cfg.warmup_steps, measure_steps=cfg.measure_steps,
                                       repeats=1)[0].wall_s

                def timed(fn) -> float:
                    from bench.common import time_call

                    return median(time_call(fn, warmup=2, repeats=7, sync=sync))

                def solve_on(x):
                    lp = {n: torch.log_softmax(v, -1) for n, v in x.items()}
                    pb = problem_from_log_probs(lp["large"], lp["small"], [lp[e] for e in experts])
                    return lambda: solve_problem(pb, solver, 2.0)

                cpu_solve, gpu_solve = timed(solve_on(cpu)), timed(solve_on(dev))
                cpu_fuse, gpu_fuse = timed(lambda: fuse(cpu, recipe)), timed(lambda: fuse(dev, recipe))
                tables.add("solver", {
                    "large": label, "solver": solver, "experts": t, "batch": b, "cpu_solve_ms": ms(cpu_solve),
                    "gpu_solve_ms": ms(gpu_solve), "cpu_fuse_ms": ms(cpu_fuse), "gpu_fuse_ms": ms(gpu_fuse),
                    "step_ms": ms(step), "cpu_share": round(cpu_solve / step, 3),
                    "gpu_share_of_step": round(gpu_solve / step, 4),
                })


def speculative_rows(cfg: GpuConfig, label: str, runners: dict[str, Any], models: dict[str, Any], heads: str,
                     tables: Tables) -> None:
    from logitfusion.engine.decoder import SpeculativeConfig

    V = runners["large"].describe().vocab_size
    prompts = random_prompts(cfg.spec_prompts, cfg.prompt_tokens, V, seed=5)
    spec = SpeculativeConfig(draft_model="expert_0", num_draft_tokens=cfg.spec_k)
    decoder = make_decoder(runners, 1)
    for name in ("static-1", "dlf-newton-1"):
        recipe = recipes(cfg.num_experts)[name]
        run_decoder(decoder, recipe, prompts[:1], new_tokens=4, tag="wp")
        run_decoder(decoder, recipe, prompts[:1], new_tokens=4, tag="ws", speculative=spec)
        p_tok = p_s = s_tok = s_s = 0.0
        drafted = accepted = 0
        identical = True
        for i, prompt in enumerate(prompts):
            p = run_decoder(decoder, recipe, [prompt], new_tokens=cfg.spec_new_tokens, tag=f"p{i}")
            s = run_decoder(decoder, recipe, [prompt], new_tokens=cfg.spec_new_tokens, tag=f"s{i}", speculative=spec)
            p_tok, p_s, s_tok, s_s = p_tok + p.tokens, p_s + p.total_s, s_tok + s.tokens, s_s + s.total_s
            drafted, accepted = drafted + s.drafted, accepted + s.accepted
            identical = identical and p.outputs == s.outputs
        tables.add("speculative", {
            "large": label, "recipe": name, "heads": heads, "plain_tok_s": round(p_tok / p_s, 1),
            "spec_tok_s": round(s_tok / s_s, 1), "speedup": round((s_tok / s_s) / (p_tok / p_s), 2),
            "acceptance": round(accepted / drafted, 3) if drafted else None, "identical": identical,
        })


def render(doc: dict[str, Any]) -> str:
    out = [f"## GPU benchmark: {doc['machine'].get('device')}", ""]
    out.append(f"measured HBM bandwidth (device-to-device copy, read + write): {doc['bandwidth_gb_s']} GB/s")
    out.append("")
    for table, cols in COLUMNS.items():
        rows = doc["tables"].get(table, [])
        if rows:
            out += [f"### {table}", "", markdown_table(cols, rows), ""]
    out += [f"- {n}" for n in doc["notes"]]
    out += [f"- skipped: {n}" for n in doc.get("skipped", [])]
    return "\n".join(out) + "\n"


NOTES = [
    "random weights (bf16) of real architectures: decode speed does not depend on the values",
    "step_ms: median steady Decoder step (LocalRunners, one thread each, all models on the one GPU), prompts of "
    "random tokens; tok_s = batch / step_ms",
    "floor_ms = (weights of every model the recipe reads + their KV cache at the mean timed length) / measured HBM "
    "bandwidth: the best possible step; of_floor = floor / step",
    "by default the Decoder fuses on the CPU (the runner contract returns fp32 CPU logits): cpu_solve/cpu_fuse are "
    "what such a step pays, gpu_solve/gpu_fuse what fusing on the device pays; decode rows named '… @cuda' run the "
    "Decoder with fusion_device='cuda' (logits copied to the GPU, fused and solved there, log-probs back for sampling)",
    "speculative: batch 1, k drafted tokens by expert_0; 'random' heads give acceptance ~ 0 (its cost), 'flat L, S "
    "heads' (bases' output layers zeroed) make the fused target the draft's own distribution: acceptance 1 (the upper "
    "bound); forward costs are the same",
]


def write(doc: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "gpu.md").write_text(render(doc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (tests the code paths)")
    ap.add_argument("--large", default="7b", help="comma-separated large sizes: 7b, 13b")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="do not start another large model after half of this many seconds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tiny:
        cfg = GpuConfig.tiny()
    else:
        unknown = [x for x in args.large.split(",") if x not in LARGES]
        if unknown:
            ap.error(f"--large: {unknown[0]!r} is not one of {', '.join(LARGES)}")
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --tiny to check the code paths on the CPU")
        cfg = GpuConfig(larges=tuple((f"llama2-{x}", LARGES[x]) for x in args.large.split(",")))
    torch.set_num_threads(cfg.fuse_threads)
    from bench.common import machine_info

    machine = machine_info()
    machine["device"] = torch.cuda.get_device_name(0) if cfg.device.startswith("cuda") else "cpu (--tiny)"
    t0 = time.perf_counter()
    bandwidth = measure_bandwidth(cfg.device, cfg.copy_bytes)
    logger.info("bandwidth %.0f GB/s", bandwidth / 1e9)
    tables = Tables()
    doc = {"machine": machine, "config": asdict(cfg), "bandwidth_gb_s": round(bandwidth / 1e9, 1),
           "tables": tables.rows, "notes": list(NOTES), "skipped": []}
    tables.on_add = lambda: write(doc, args.out)
    for i, (label, large) in enumerate(cfg.larges):
        if i and time.perf_counter() - t0 > args.deadline_s / 2:
            doc["skipped"].append(f"{label}: not started, {time.perf_counter() - t0:.0f} s already spent")
            continue
        run_large(cfg, label, large, bandwidth, tables)  # every row is written at once: a run cut short keeps them
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
    write(doc, args.out)
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
