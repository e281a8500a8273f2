"""Training-free, label-free routing by prompt likelihood, next to routed_multi (issue 12): its table on the zoo.

The likelihood score of docs/algorithms.md §6 rates expert t on the prompt x_1..x_n by the per-token shifts
    d_t,i = log p_Et(x_i | x_<i) - log p_S(x_i | x_<i),   i = 2..n
Variants measured here (each routes top-1, then fuses with DLF newton: top-1 routing then DLF is exactly single-expert
DLF with the routed expert, which tests/unit/test_fusion_routing.py checks):
    mean        s_t = mean_i d_t,i; "none" (the large base alone) when every s_t < 0 (the small base explains the
                prompt better than any expert)
    centred     s_t = sum_i max(0, d_t,i - mean_u d_u,i): the shift of each token relative to the other experts,
                positive parts only (the best likelihood variant found in the issue's probe)
and, for reference, the representation routing of routed_multi (fusion/routing.py) on the same prompts.

    python -m bench.routing_variants [--limit N] [--json results/routing_variants.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


@torch.inference_mode()
def likelihood_scores(models: dict, small: str, experts: list[str], ids: list[int]) -> torch.Tensor:
    """[T, n - 1] per-token shifts d_t,i of the prompt ``ids`` (full forwards, no cache)."""
    x = torch.tensor([ids])
    tgt = x[0, 1:]  # [n - 1]

    def token_lp(name: str) -> torch.Tensor:
        lp = torch.log_softmax(models[name](input_ids=x).logits[0, :-1].float(), -1)  # [n - 1, V']
        return lp.gather(1, tgt.unsqueeze(1))[:, 0]  # [n - 1]

    base = token_lp(small)
    return torch.stack([token_lp(e) - base for e in experts])  # [T, n - 1]


def route_mean(d: torch.Tensor) -> int:
    """Expert index, or -1 for none."""
    s = d.mean(1)  # [T]
    return int(s.argmax()) if float(s.max()) > 0 else -1


def route_centred(d: torch.Tensor) -> int:
    return int((d - d.mean(0, keepdim=True)).clamp_min(0).sum(1).argmax())


def main(argv: list[str] | None = None) -> int:
    from logitfusion.engine.decoder import Decoder, GenerationRequest
    from logitfusion.eval.metrics import gap_closed
    from logitfusion.eval.run import load_zoo_runners, run_requests, zoo_route_examples
    from logitfusion.fusion import presets
    from logitfusion.models.zoo import tasks as zt
    from logitfusion.models.zoo.build import load_zoo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    zoo = load_zoo()
    tasks = list(zt.expert_tasks())
    experts = [f"expert_{t}" for t in tasks]
    all_tasks = tasks + list(zt.unseen_tasks())
    runners = load_zoo_runners(zoo, ["large", "small", *experts, *(f"large_ft_{t}" for t in all_tasks)])
    tok = runners["large"].tokenizer
    models = {n: r._model for n, r in runners.items()}
    decoder = Decoder(runners, eos_token_ids=[tok.eos_token_id], max_batch_size=32, max_waiting_requests=1 << 20,
                      decode_fn=lambda ids: tok.decode(list(ids), skip_special_tokens=True))
    routed = presets.routed("large", "small", experts, zoo_route_examples(zoo.model("small"), tasks))
    variants = {"mean": route_mean, "centred": route_centred}
    recipe_of = {-1: presets.single("large"), **{i: presets.dlf("large", "small", [e]) for i, e in enumerate(experts)}}

    requests, meta, routing = [], {}, {}
    for t in all_tasks:
        for j, it in enumerate(zt.eval_items(t, limit=args.limit)):
            ids = tok(it.prompt)["input_ids"]
            d = likelihood_scores(models, "small", experts, ids)
            for v, fn in variants.items():
                k = fn(d)
                routing.setdefault((t, v), []).append(k)
                rid = f"{t}/{v}/{j}"
                requests.append(GenerationRequest(rid, ids, recipe_of[k], max_new_tokens=zt.max_new_tokens(t),
                                                  stop_strings=("\n",)))
                meta[rid] = (t, v, it.reference)
            for v, recipe in (("representation", routed), ("large_base", presets.single("large")),
                              ("large_finetuned", presets.single(f"large_ft_{t}"))):
                rid = f"{t}/{v}/{j}"
                requests.append(GenerationRequest(rid, ids, recipe, max_new_tokens=zt.max_new_tokens(t),
                                                  stop_strings=("\n",)))
                meta[rid] = (t, v, it.reference)
    results = run_requests(decoder, requests, progress=False)
    acc: dict[tuple[str, str], list[float]] = {}
    for rid, (t, v, ref) in meta.items():
        acc.setdefault((t, v), []).append(zt.score(results[rid].text, ref))
        if v == "representation":
            w = results[rid].route
            routing.setdefault((t, v), []).append(max(range(len(w)), key=lambda i: w[i]) if any(w) else -1)
    rows = []
    for t in all_tasks:
        a = {v: 100 * sum(x) / len(x) for (tt, v), x in acc.items() if tt == t}
        own = tasks.index(t) if t in tasks else -1
        for v in ("mean", "centred", "representation"):
            picks = routing[(t, v)]
            rows.append({
                "task": t, "variant": v, "routed_right": sum(k == own for k in picks), "n": len(picks),
                "none": sum(k == -1 for k in picks), "accuracy": round(a[v], 1),
                "gap_closed": None if gap_closed(a[v], a["large_base"], a["large_finetuned"]) is None
                else round(100 * gap_closed(a[v], a["large_base"], a["large_finetuned"]), 1),
            })
    cols = ["task", "variant", "routed_right", "none", "n", "accuracy", "gap_closed"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for r in runners.values():
        r.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
