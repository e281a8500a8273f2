"""The tiny model zoo (ZOO.md): a deterministic recipe that trains a small Llama family on a synthetic world.

Models: "small" (S), "large" (L), "expert_<task>" (S fine-tuned on one task), "large_ft_<task>" (L fine-tuned on
the same data: the upper bound). All share one tokenizer and are saved as Hugging Face directories.

- ``build(cache_dir=None, force=False, progress=True) -> ZooPaths``: train (or reuse) the zoo for the current recipe.
- ``zoo_path()`` / ``load_zoo()``: find the committed zoo, else the cached build, else raise ``ZooNotBuilt``.
- ``logitfusion.models.zoo.tasks``: held-out evaluation items, scoring rule, few-shot prompts.
- ``logitfusion.models.zoo.merge.merge_experts``: task arithmetic.
"""

from logitfusion.models.zoo.build import ZooNotBuilt, ZooPaths, build, load_zoo, zoo_path
from logitfusion.models.zoo.recipe import DEFAULT_RECIPE, RECIPE_VERSION, ZooRecipe, recipe_hash

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPE_VERSION",
    "ZooNotBuilt",
    "ZooPaths",
    "ZooRecipe",
    "build",
    "load_zoo",
    "recipe_hash",
    "zoo_path",
]
