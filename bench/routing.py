"""What routing adds to a request's prefill (issue 12's bar: at most 5%), on the zoo's trained models.

A routed request's prefill is the Decoder's first step: every model extends the prompt, the small base also returns
the prompt's mean last hidden state (ExtendOp.features_tokens), the request is routed, fused and sampled. Arms, each
a first step with max_new_tokens = 1 (the step also frees the caches), interleaved round by round so that load from
other processes hits them alike:

    static_same     the four experts' deltas at the alphas routing picks (1 for the prompt's own expert, else 0):
                    the same models, forwards and fusion arithmetic as routed_static, without routing
    routed_static   routed_multi_static: the same, plus the representation, the routing and the weight scaling
    dlf_multi       DLF newton over the four experts (no routing), for scale
    routed_dlf      routed_multi (the zoo default: top-1, inner DLF newton)

The overhead is routed_static / static_same - 1 (median wall and CPU time per round); the DLF arms are reported for
scale. The one-off cost of an example table (32 example prompts through the small base, once per example set and
process) is timed apart.

    python -m bench.routing [--rounds 40] [--batch 1 8] [--models zoo|random] [--json results/routing.json]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import torch

from bench.common import machine_info, markdown_table, median


def _load():
    from logitfusion.engine.decoder import Decoder
    from logitfusion.eval.run import load_zoo_runners, zoo_route_examples
    from logitfusion.models.zoo import tasks as zt
    from logitfusion.models.zoo.build import load_zoo

    zoo = load_zoo()
    tasks = list(zt.expert_tasks())
    experts = [f"expert_{t}" for t in tasks]
    runners = load_zoo_runners(zoo, ["large", "small", *experts])
    tok = runners["large"].tokenizer
    decoder = Decoder(runners, eos_token_ids=[tok.eos_token_id], max_batch_size=64)
    examples = zoo_route_examples(zoo.model("small"), tasks)
    prompts = [(t, tok.encode(it.prompt)) for t in tasks for it in zt.eval_items(t, limit=16)]
    return decoder, runners, experts, examples, prompts


def _load_random(prompt_tokens: int = 24):
    """bench.models' CPU family (large: 12 layers of 512, small and 4 experts: 2 layers of 128, V = 32000), random
    prompts; the examples are random prompts too (routing picks an arbitrary expert, which costs the same)."""
    from bench.models import CPU_LARGE, CPU_SMALL, RandomFamily
    from logitfusion.engine.decoder import Decoder

    fam = RandomFamily(CPU_LARGE, CPU_SMALL, 4)
    experts = list(fam.experts)
    runners = fam.runners(["large", "small", *experts])
    decoder = Decoder(runners, max_batch_size=64)
    g = torch.Generator().manual_seed(0)

    def rand_prompt() -> list[int]:
        return torch.randint(3, fam.vocab_size, (prompt_tokens,), generator=g).tolist()

    examples = tuple(tuple(tuple(rand_prompt()) for _ in range(8)) for _ in experts)
    prompts = [(e.removeprefix("expert_"), rand_prompt()) for e in experts for _ in range(16)]
    return decoder, runners, experts, examples, prompts


def _first_step(decoder, batch, recipe_of) -> tuple[float, float]:
    """Wall and CPU seconds of one Decoder step admitting ``batch`` requests of one new token each."""
    from logitfusion.engine.decoder import GenerationRequest

    for task, ids in batch:
        decoder.add_request(GenerationRequest(f"b-{uuid.uuid4().hex[:8]}", ids, recipe_of(task), max_new_tokens=1))
    t0, c0 = time.perf_counter(), time.process_time()
    decoder.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    while decoder.has_work():  # nothing is left after a one-token step; kept for safety
        decoder.step()
    return wall, cpu


def run(rounds: int, batch_size: int, models: str = "zoo") -> dict:
    from logitfusion.engine.routing import compute_table
    from logitfusion.fusion import presets

    torch.set_num_threads(1)
    decoder, runners, experts, examples, prompts = _load() if models == "zoo" else _load_random()
    threshold = 0.5 if models == "zoo" else -1.0  # random examples: always route (to an arbitrary expert)
    routed_static = presets.routed("large", "small", experts, examples, inner="static", min_similarity=threshold)
    routed_dlf = presets.routed("large", "small", experts, examples, min_similarity=threshold)
    dlf_multi = presets.dlf("large", "small", experts, solver="newton")
    static_of = {
        f"expert_{t}".removeprefix("expert_"): presets.static(
            "large", "small", experts, [1.0 if e == f"expert_{t}" else 0.0 for e in experts]
        )
        for t in (e.removeprefix("expert_") for e in experts)
    }
    arms = {
        "static_same": lambda t: static_of[t],
        "routed_static": lambda t: routed_static,
        "dlf_multi": lambda t: dlf_multi,
        "routed_dlf": lambda t: routed_dlf,
    }
    t0 = time.perf_counter()
    compute_table(runners["small"], routed_dlf.route)
    table_s = time.perf_counter() - t0
    for name, arm in arms.items():  # warm-up (and the Decoder's table for the routed arms)
        _first_step(decoder, prompts[:batch_size], arm)
    walls: dict[str, list[float]] = {k: [] for k in arms}
    cpus: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(rounds):
        batch = [prompts[(r * batch_size + i) % len(prompts)] for i in range(batch_size)]
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for name in order:
            w, c = _first_step(decoder, batch, arms[name])
            walls[name].append(w)
            cpus[name].append(c)
    rows = []
    base_w, base_c = median(walls["static_same"]), median(cpus["static_same"])
    for name in arms:
        # paired per round: the ratio of this arm to static_same in the same round, then the median
        ratio_w = median([a / b for a, b in zip(walls[name], walls["static_same"])])
        ratio_c = median([a / b for a, b in zip(cpus[name], cpus["static_same"])])
        rows.append({
            "arm": name, "batch": batch_size, "prefill_ms": round(1e3 * median(walls[name]), 2),
            "prefill_cpu_ms": round(1e3 * median(cpus[name]), 2),
            "vs_static_same_wall": round(ratio_w - 1, 4), "vs_static_same_cpu": round(ratio_c - 1, 4),
        })
    for r in runners.values():
        r.close()
    return {
        "models": models, "rounds": rounds, "batch": batch_size, "example_table_once_ms": round(1e3 * table_s, 2),
        "static_same_ms": round(1e3 * base_w, 2), "static_same_cpu_ms": round(1e3 * base_c, 2),
        "rows": rows, "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    p.add_argument("--models", choices=["zoo", "random"], default="zoo",
                   help="the committed zoo, or bench.models' CPU family (12 x 512 large, V = 32000)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    docs = [run(args.rounds, b, args.models) for b in args.batch]
    cols = ["arm", "batch", "prefill_ms", "prefill_cpu_ms", "vs_static_same_wall", "vs_static_same_cpu"]
    for d in docs:
        print(f"\n### routing overhead at prefill, {d['models']} models, batch {d['batch']} ({d['rounds']} paired rounds); "
              f"example table once: {d['example_table_once_ms']} ms\n")
        print(markdown_table(cols, d["rows"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(docs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
