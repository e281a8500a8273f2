"""The zoo recipe: every number that decides what the zoo's models are, in one frozen tree.

The recipe's hash (sha256 of its canonical JSON plus ``RECIPE_VERSION``) names the build directory and is stored in
the committed zoo's manifest, so changing any number here without rebuilding is caught by a unit test.
Bump ``RECIPE_VERSION`` when the code that turns the recipe into data changes in a way the numbers do not show
(templates, sampling order, training loop).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

RECIPE_VERSION = "zoo-v3"


@dataclass(frozen=True)
class WorldSpec:
    """The synthetic world: fictional lands with facts, plus word arithmetic."""

    seed: int = 20240611  # seeds names, facts, the train/held-out split
    n_entities: int = 160  # fictional lands; each has one value per relation
    heldout_fraction: float = 0.4  # share of lands (and of sum pairs) never seen in fine-tuning
    n_colours: int = 12  # flag colours to choose from
    n_animals: int = 16  # national animals to choose from (the unseen task's relation)
    year_min: int = 1200  # founding years are drawn from [year_min, year_max]
    year_max: int = 1999
    add_max: int = 19  # word arithmetic: a + b with 0 <= a, b <= add_max


@dataclass(frozen=True)
class ModelSpec:
    """A Llama architecture (all zoo models are Llama so tensor-parallel sharding applies)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    vocab_pad_multiple: int = 32  # config.vocab_size is padded above the tokenizer's size, as real checkpoints do
    init_seed: int = 0


@dataclass(frozen=True)
class PretrainSpec:
    """Causal-LM pre-training on the declarative corpus."""

    steps: int
    batch_rows: int = 32  # sequences per optimizer step
    seq_len_tokens: int = 128  # packed row length
    lr: float = 3e-3  # peak learning rate (AdamW, linear warm-up then cosine to lr * min_lr_ratio)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    data_seed: int = 1  # seeds the sentence stream


@dataclass(frozen=True)
class FinetuneSpec:
    """Supervised fine-tuning on one task's question/answer pairs (loss on the answer and EOS only)."""

    steps: int
    batch_rows: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    replay_fraction: float = 0.0  # share of each batch drawn from pre-training sentences (guards against forgetting)
    data_seed: int = 2


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the zoo."""

    world: WorldSpec = field(default_factory=WorldSpec)
    small: ModelSpec = field(
        default_factory=lambda: ModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160)
    )
    large: ModelSpec = field(
        default_factory=lambda: ModelSpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352)
    )
    pretrain_small: PretrainSpec = field(default_factory=lambda: PretrainSpec(steps=300))
    pretrain_large: PretrainSpec = field(default_factory=lambda: PretrainSpec(steps=1000))
    finetune_small: FinetuneSpec = field(default_factory=lambda: FinetuneSpec(steps=150))
    finetune_large: FinetuneSpec = field(default_factory=lambda: FinetuneSpec(steps=100))
    expert_tasks: tuple[str, ...] = ("capital", "colour", "year", "add")
    unseen_tasks: tuple[str, ...] = ("animal",)  # no small expert; a large fine-tuned model as the upper bound
    torch_threads: int = 1
    save_dtype: str = "bfloat16"  # weights on disk ("float32" or "bfloat16"); training always runs in float32


def recipe_json(recipe: ZooRecipe) -> str:
    """Canonical JSON of the recipe (sorted keys, no whitespace) including ``RECIPE_VERSION``."""
    body = {"recipe_version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def recipe_hash(recipe: ZooRecipe | None = None) -> str:
    """sha256 hex digest of the canonical recipe JSON; the default recipe when ``recipe`` is None."""
    return hashlib.sha256(recipe_json(recipe or ZooRecipe()).encode("utf-8")).hexdigest()


DEFAULT_RECIPE = ZooRecipe()
