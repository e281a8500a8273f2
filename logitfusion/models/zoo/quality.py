"""The zoo's quality table: does the zoo show weak-to-strong transfer?

Per task, greedy accuracy on held-out items of: L (large base), S (small base), E_t (expert), L_t (large
fine-tuned), static proxy-tuning l_L + (l_E - l_S), and for unseen tasks the multi-expert static fusion
l_L + sum_t (l_{E_t} - l_S) / T. Plus the declarative probe ("the capital of X is") of S and L on every land,
which checks that L knows more facts than S before any fine-tuning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from logitfusion.models.zoo.check import Weighted, accuracy, probe_accuracy
from logitfusion.models.zoo.recipe import ZooRecipe
from logitfusion.models.zoo.world import RELATIONS, cached_world, probe_items, task_items

if TYPE_CHECKING:
    from logitfusion.models.zoo.build import ZooPaths

log = logging.getLogger(__name__)

EVAL_LIMIT = 100  # held-out items per task in the build's check (the add task has more)


def _load(path: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def quality_table(paths: ZooPaths, recipe: ZooRecipe, limit: int = EVAL_LIMIT) -> dict:
    """{"probe": {model: {relation: acc}}, "tasks": {task: {column: acc}}} for the zoo at ``paths``."""
    from tokenizers import Tokenizer

    world = cached_world(recipe.world)
    tok = Tokenizer.from_file(str(paths.small / "tokenizer.json"))
    small, large = _load(paths.small), _load(paths.large)
    experts = {t: _load(p) for t, p in paths.experts.items()}
    out: dict = {"probe": {}, "tasks": {}, "eval_items": {}}
    for name, model in (("small", small), ("large", large)):
        out["probe"][name] = {
            rel: round(probe_accuracy(model, tok, probe_items(world, rel)), 4) for rel in (*RELATIONS, "add")
        }
        log.info("zoo check: probe %s %s", name, out["probe"][name])
    for task in recipe.expert_tasks + recipe.unseen_tasks:
        items = task_items(world, task, "heldout")[:limit]
        out["eval_items"][task] = len(items)
        row = {
            "large": accuracy([Weighted(large, 1.0)], tok, items),
            "small": accuracy([Weighted(small, 1.0)], tok, items),
        }
        if task in experts:
            row["expert"] = accuracy([Weighted(experts[task], 1.0)], tok, items)
            row["static"] = accuracy(
                [Weighted(large, 1.0), Weighted(experts[task], 1.0), Weighted(small, -1.0)], tok, items
            )
        row["large_ft"] = accuracy([Weighted(_load(paths.large_ft[task]), 1.0)], tok, items)
        if experts:
            share = 1.0 / len(experts)
            terms = [Weighted(large, 1.0), Weighted(small, -1.0 * share * len(experts))]
            terms += [Weighted(e, share) for e in experts.values()]
            row["static_all_experts_mean"] = accuracy(terms, tok, items)
        out["tasks"][task] = {k: round(v, 4) for k, v in row.items()}
        log.info("zoo check: %s %s", task, out["tasks"][task])
    return out
