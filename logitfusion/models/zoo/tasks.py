"""The zoo's evaluation tasks: held-out question/answer items, the scoring rule, few-shot prompts.

This is the interface the evaluation module uses (every function takes an optional ``recipe``; the default is the
recipe the committed zoo was built from):

- ``task_names()`` -> all tasks, ``expert_tasks()`` -> tasks with a small expert ("expert_<task>"),
  ``unseen_tasks()`` -> tasks without one (only "large_ft_<task>" exists, as the upper bound).
- ``eval_items(task, limit=None)`` -> held-out ``EvalItem(prompt, reference, key, value)``: lands (or sum pairs) whose
  facts appear only in pre-training, never in fine-tuning.
- ``train_items(task)`` -> the fine-tuning items (same format), e.g. for few-shot examples.
- ``few_shot_prefix(task, k)`` / ``few_shot_prompt(task, prompt, k)`` -> k solved training examples, one per line,
  then the prompt: the "few-shot large model" baseline.
- ``max_new_tokens(task)`` -> a generation budget that fits every reference answer plus EOS.
- ``score(generated, reference)`` -> 1.0 / 0.0: exact match after ``normalize_answer`` (text up to the first
  newline; EOS ends generation; lower-case; whitespace collapsed; punctuation kept).

Prompts end with "answer:"; the model is expected to generate the answer, then EOS. Prompts are plain text: the zoo
tokenizer adds BOS itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from logitfusion.models.zoo.recipe import DEFAULT_RECIPE, ZooRecipe
from logitfusion.models.zoo.world import TASKS, World, cached_world, task_items


@dataclass(frozen=True)
class EvalItem:
    """One question: the prompt text and its reference answer."""

    prompt: str
    reference: str  # the full reference answer, e.g. "the capital of zarvok is velmora"
    key: str  # the land, or "a+b" for sums
    value: str  # the fact the answer states, e.g. "velmora"


def _world(recipe: ZooRecipe | None) -> World:
    return cached_world((recipe or DEFAULT_RECIPE).world)


def task_names(recipe: ZooRecipe | None = None) -> tuple[str, ...]:
    """Every task of the zoo: expert tasks first, then unseen tasks."""
    r = recipe or DEFAULT_RECIPE
    return r.expert_tasks + r.unseen_tasks


def expert_tasks(recipe: ZooRecipe | None = None) -> tuple[str, ...]:
    """Tasks with a small expert ``expert_<task>`` and a large fine-tuned ``large_ft_<task>``."""
    return (recipe or DEFAULT_RECIPE).expert_tasks


def unseen_tasks(recipe: ZooRecipe | None = None) -> tuple[str, ...]:
    """Tasks no expert was tuned on (multi-expert fusion must generalise); ``large_ft_<task>`` is the upper bound."""
    return (recipe or DEFAULT_RECIPE).unseen_tasks


def _check_task(task: str, recipe: ZooRecipe | None) -> None:
    if task not in task_names(recipe):
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(task_names(recipe))}")


def eval_items(task: str, limit: int | None = None, recipe: ZooRecipe | None = None) -> list[EvalItem]:
    """Held-out items of ``task`` in a fixed order (the first ``limit`` if given)."""
    _check_task(task, recipe)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    items = [EvalItem(it.prompt, it.answer, it.key, it.value) for it in task_items(_world(recipe), task, "heldout")]
    return items[:limit] if limit is not None else items


def train_items(task: str, recipe: ZooRecipe | None = None) -> list[EvalItem]:
    """The fine-tuning items of ``task`` (training lands or sum pairs)."""
    _check_task(task, recipe)
    return [EvalItem(it.prompt, it.answer, it.key, it.value) for it in task_items(_world(recipe), task, "train")]


def route_example_prompts(task: str, k: int = 8, recipe: ZooRecipe | None = None) -> list[str]:
    """``k`` prompts of ``task``'s TRAINING items, evenly spaced (never held-out ones): the examples an expert is
    registered with for routed fusion (fusion/routing.py)."""
    if not 1 <= k <= 64:
        raise ValueError(f"k (route examples) must be in [1, 64], got {k}")
    items = train_items(task, recipe)
    return [it.prompt for it in items[:: max(1, len(items) // k)][:k]]


def few_shot_prefix(task: str, k: int = 3, recipe: ZooRecipe | None = None) -> str:
    """``k`` solved training examples of ``task``, each 'prompt answer' on its own line, ending with a newline."""
    if not 0 <= k <= 16:
        raise ValueError(f"k (few-shot examples) must be in [0, 16], got {k}")
    shots = train_items(task, recipe)[:: max(1, len(train_items(task, recipe)) // max(k, 1))][:k]
    return "".join(f"{s.prompt} {s.reference}\n" for s in shots)


def few_shot_prompt(task: str, prompt: str, k: int = 3, recipe: ZooRecipe | None = None) -> str:
    """``few_shot_prefix(task, k)`` followed by ``prompt``."""
    return few_shot_prefix(task, k, recipe) + prompt


def max_new_tokens(task: str, recipe: ZooRecipe | None = None) -> int:
    """Enough new tokens for the longest reference answer of ``task`` plus EOS, with two tokens of slack."""
    _check_task(task, recipe)
    return _max_answer_tokens(recipe or DEFAULT_RECIPE, task) + 3


@lru_cache(maxsize=32)
def _max_answer_tokens(recipe: ZooRecipe, task: str) -> int:
    from logitfusion.models.zoo.tokenizer import build_tokenizer

    world = _world(recipe)
    tok = build_tokenizer(world)
    answers = [it.answer for split in ("train", "heldout") for it in task_items(world, task, split)]
    return max(len(e.ids) for e in tok.encode_batch(answers, add_special_tokens=False))


_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Text up to the first newline, lower-cased, whitespace collapsed and stripped.

    Punctuation is kept: the tasks' format is the bare answer sentence, so "the flag is red." does not match.
    """
    first_line = text.split("\n", 1)[0]
    return _SPACES.sub(" ", first_line).strip().lower()


def score(generated: str, reference: str) -> float:
    """1.0 if the generated answer equals the reference after normalisation, else 0.0."""
    return 1.0 if normalize_answer(generated) == normalize_answer(reference) else 0.0


__all__ = [
    "TASKS",
    "EvalItem",
    "eval_items",
    "expert_tasks",
    "few_shot_prefix",
    "few_shot_prompt",
    "max_new_tokens",
    "normalize_answer",
    "route_example_prompts",
    "score",
    "task_names",
    "train_items",
    "unseen_tasks",
]
