"""Evaluate fusion methods on the zoo tasks and print the table of docs/algorithms.md §10.

Per task: large base, small expert, large fine-tuned (the upper bound), static proxy-tuning (alpha = 1), DLF with
each solver; then the variants: several experts fused with no task label ("multi"), the relation no expert was
tuned on ("unseen"), few-shot examples given to the large model only ("fewshot"), and a task-arithmetic merged
expert ("merged"). The routed methods ("routed_*_multi") pick each request's experts from its prompt, with every
expert registered by 8 prompts of its TRAINING items (``zoo_route_examples``); the held-out items are never seen. Every (task, method, item) becomes one request; all of them run through ONE Decoder over
in-process LocalRunners, batched, so the methods share each model's forward.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from logitfusion.engine.decoder import Decoder, GenerationRequest
from logitfusion.engine.local import LocalRunner
from logitfusion.eval.metrics import Row, format_table, make_rows, write_json
from logitfusion.fusion import Recipe, SamplingParams, presets
from logitfusion.fusion.methods import SOLVERS
from logitfusion.models.zoo import tasks as zt
from logitfusion.models.zoo.build import load_zoo
from logitfusion.models.zoo.merge import merge_experts

log = logging.getLogger(__name__)

MERGED = "merged_experts"  # the model name of the task-arithmetic merge of every expert


@dataclass(frozen=True)
class Method:
    """One way of answering: a recipe, and whether the large model sees few-shot examples first."""

    name: str
    recipe: Recipe
    setting: str = "single"  # single | multi | unseen | fewshot | merged
    fewshot_model: str | None = None  # this model's prompt is prefixed with k solved examples


@dataclass
class EvalItemResult:
    task: str
    method: str
    key: str
    prompt: str
    reference: str
    output: str
    correct: float
    weights: list[list[float]] = field(default_factory=list)


ROUTED = ("routed_multi", "routed_soft_multi", "routed_static_multi")


def methods_for_task(
    task: str,
    experts: Sequence[str],
    unseen: bool,
    *,
    merged: bool = True,
    route_examples: Sequence[Sequence[Sequence[int]]] | None = None,
) -> list[Method]:
    """Every method evaluated on ``task``; ``experts`` are the expert model names of the whole zoo.
    ``route_examples`` (one list of example prompt ids per expert) adds the routed methods."""
    large, small, large_ft = "large", "small", f"large_ft_{task}"
    ms = [Method("large_base", presets.single(large)), Method("large_finetuned", presets.single(large_ft))]
    if not unseen:
        expert = f"expert_{task}"
        ms += [
            Method("expert", presets.single(expert)),
            Method("static", presets.proxy_tuning(large, small, expert, 1.0)),
            *(Method(f"dlf_{s}", presets.dlf(large, small, [expert], solver=s)) for s in SOLVERS),
            Method("large_base_fewshot", presets.single(large), "fewshot", fewshot_model=large),
            Method("dlf_newton_fewshot", presets.dlf(large, small, [expert], "newton"), "fewshot", fewshot_model=large),
        ]
    multi = "unseen" if unseen else "multi"
    ms += [
        Method("static_multi", presets.static(large, small, list(experts), [1.0 / len(experts)] * len(experts)), multi),
        Method("dlf_grid_multi", presets.dlf(large, small, list(experts), solver="grid"), multi),
        Method("dlf_newton_multi", presets.dlf(large, small, list(experts), solver="newton"), multi),
        Method("dlf_joint_multi", presets.dlf(large, small, list(experts), solver="joint"), multi),
    ]
    if route_examples is not None:
        ex, names = route_examples, list(experts)
        ms += [
            Method("routed_multi", presets.routed(large, small, names, ex), multi),  # top-1, inner DLF
            Method("routed_soft_multi", presets.routed(large, small, names, ex, top_k=0), multi),
            Method("routed_static_multi", presets.routed(large, small, names, ex, inner="static"), multi),
        ]
    if merged:
        ms += [
            Method("merged_expert", presets.single(MERGED), "merged"),
            Method("dlf_merged", presets.dlf(large, small, [MERGED], solver="newton"), "merged"),
        ]
    return ms


def merge_all_experts(zoo, out_dir: Path, lam: float = 0.5) -> Path:
    """Task arithmetic: S + sum_t lam (E_t - S) over every expert of the zoo, written once to ``out_dir``."""
    if (out_dir / "config.json").is_file():
        return out_dir
    tasks = sorted(zoo.experts)
    return merge_experts(zoo.small, [zoo.experts[t] for t in tasks], [lam] * len(tasks), out_dir)


def zoo_route_examples(
    tokenizer_dir: str | Path, tasks: Sequence[str], k: int = 8
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per expert task: ``k`` of its TRAINING prompts as token ids (the tokenizer in ``tokenizer_dir``, BOS
    included, exactly as the requests' prompts are encoded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return tuple(tuple(tuple(tok(p)["input_ids"]) for p in zt.route_example_prompts(t, k)) for t in tasks)


def load_zoo_runners(zoo, names: Iterable[str], extra: dict[str, Path] | None = None) -> dict:
    """One in-process LocalRunner per model name (zoo names, or ``extra`` name -> directory)."""
    extra = extra or {}
    runners = {}
    for name in names:
        path = extra[name] if name in extra else zoo.model(name)
        runners[name] = LocalRunner.from_pretrained(path, name)
    return runners


def run_requests(decoder, requests: Sequence, *, progress: bool = True, desc: str = "eval") -> dict:
    """Drive ``decoder`` until every request finished; returns request_id -> GenerationResult."""
    results = {}
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, mininterval=1.0) as bar, \
            contextlib.closing(decoder.run(requests)) as finished:
        for res in finished:
            if res.error:
                raise ValueError(res.error)
            results[res.request_id] = res
            bar.update(1)
    return results


def evaluate_zoo(
    *,
    limit: int | None = None,
    tasks: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    fewshot_k: int = 3,
    keep_items: bool = False,
    on_item: Callable[[EvalItemResult], None] | None = None,
) -> tuple[list[Row], list[EvalItemResult]]:
    """Run every method on every zoo task; returns the report rows (and the per-item results if asked)."""
    zoo = load_zoo()
    all_tasks = list(zt.task_names())
    chosen = list(tasks) if tasks else all_tasks
    for t in chosen:
        if t not in all_tasks:
            raise ValueError(f"--tasks: unknown task {t!r}; known: {', '.join(all_tasks)}")
    unseen = set(zt.unseen_tasks())
    expert_names = [f"expert_{t}" for t in zt.expert_tasks()]

    with tempfile.TemporaryDirectory(prefix="logitfusion-merge-") as tmp:
        merged_dir = merge_all_experts(zoo, Path(tmp) / MERGED)
        examples = zoo_route_examples(zoo.model("small"), zt.expert_tasks())
        plan = {t: methods_for_task(t, expert_names, t in unseen, route_examples=examples) for t in chosen}
        needed = sorted({m for ms in plan.values() for meth in ms for m in meth.recipe.model_names()})
        runners = load_zoo_runners(zoo, needed, extra={MERGED: merged_dir})
        tok = next(r.tokenizer for r in runners.values())
        decoder = Decoder(
            runners,
            eos_token_ids=[tok.eos_token_id],
            decode_fn=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
            max_batch_size=batch_size,
            max_waiting_requests=1_000_000,
        )
        requests, meta = [], {}
        for t in chosen:
            items = zt.eval_items(t, limit=limit)
            budget = zt.max_new_tokens(t)
            for meth in plan[t]:
                for i, it in enumerate(items):
                    rid = f"{t}/{meth.name}/{i}"
                    ids = tok(it.prompt)["input_ids"]
                    model_prompts = {}
                    if meth.fewshot_model:
                        model_prompts[meth.fewshot_model] = tok(zt.few_shot_prompt(t, it.prompt, fewshot_k))["input_ids"]
                    requests.append(
                        GenerationRequest(
                            request_id=rid,
                            prompt_ids=ids,
                            recipe=meth.recipe,
                            sampling=SamplingParams(),
                            max_new_tokens=budget,
                            stop_strings=("\n",),
                            model_prompts=model_prompts,
                        )
                    )
                    meta[rid] = (t, meth, it)
        log.info("evaluating %d requests over %d tasks with %d models", len(requests), len(chosen), len(runners))
        t0 = time.perf_counter()
        results = run_requests(decoder, requests, progress=progress)
        log.info("evaluation took %.1f s", time.perf_counter() - t0)
        for r in runners.values():
            r.close()

    correct: dict[tuple[str, str], list[float]] = defaultdict(list)
    items_out = []
    for rid, (t, meth, it) in meta.items():
        res = results[rid]
        ok = zt.score(res.text, it.reference)
        correct[(t, meth.name)].append(ok)
        item = EvalItemResult(t, meth.name, it.key, it.prompt, it.reference, res.text, ok, res.weights)
        if on_item:
            on_item(item)
        if keep_items:
            items_out.append(item)

    rows: list[Row] = []
    for t in chosen:
        acc = {m.name: sum(correct[(t, m.name)]) / len(correct[(t, m.name)]) for m in plan[t]}
        settings = {m.name: m.setting for m in plan[t]}
        rows += make_rows(t, acc, len(correct[(t, "large_base")]), settings=settings)
    return rows, items_out


def eval_main(args) -> int:
    rows, _ = evaluate_zoo(limit=args.limit, tasks=args.tasks, batch_size=args.batch_size)
    print(format_table(rows))
    write_json(rows, args.json)
    print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0
