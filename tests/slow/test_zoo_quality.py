"""The committed zoo keeps its promise: every model loads, shares one vocabulary, and on a held-out sample the large
fine-tuned model beats both the large base and the small expert by at least 20 accuracy points (ZOO.md).

Slow: loads 11 models and decodes a few hundred greedy answers on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from logitfusion.models.loading import load_model
from logitfusion.models.vocab import check_vocabularies
from logitfusion.models.zoo import load_zoo, tasks
from logitfusion.models.zoo.check import Weighted, accuracy
from logitfusion.models.zoo.world import Item

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SAMPLE = 40  # held-out items per task
TASK = "capital"


@pytest.fixture(scope="module")
def zoo_models() -> dict:
    torch.set_num_threads(1)
    zoo = load_zoo()
    return {name: load_model(zoo.model(name), name=name) for name in zoo.names()}


def _items(task: str) -> list[Item]:
    return [Item(it.key, it.prompt, it.reference, it.value) for it in tasks.eval_items(task, limit=SAMPLE)]


def _acc(models: dict, terms: list[tuple[str, float]], task: str) -> float:
    tok = models["small"].tokenizer.backend_tokenizer
    return accuracy([Weighted(models[n].model, c) for n, c in terms], tok, _items(task),
                    max_new_tokens=tasks.max_new_tokens(task))  # fmt: skip


def test_every_model_loads_with_one_vocabulary(zoo_models: dict) -> None:
    check_vocabularies({name: m.tokenizer for name, m in zoo_models.items()})
    sizes = {name: m.num_parameters for name, m in zoo_models.items()}
    assert sizes["large"] >= 4 * sizes["small"], sizes
    for task in tasks.expert_tasks():
        assert sizes[f"expert_{task}"] == sizes["small"] and sizes[f"large_ft_{task}"] == sizes["large"]


def test_large_fine_tuned_beats_large_base_and_expert(zoo_models: dict) -> None:
    large = _acc(zoo_models, [("large", 1.0)], TASK)
    expert = _acc(zoo_models, [(f"expert_{TASK}", 1.0)], TASK)
    large_ft = _acc(zoo_models, [(f"large_ft_{TASK}", 1.0)], TASK)
    assert large_ft >= max(large, expert) + 0.2, {"large": large, "expert": expert, "large_ft": large_ft}


def test_static_proxy_tuning_transfers(zoo_models: dict) -> None:
    """l_L + (l_E - l_S) closes a good part of the gap between the large base and the large fine-tuned model."""
    large = _acc(zoo_models, [("large", 1.0)], TASK)
    large_ft = _acc(zoo_models, [(f"large_ft_{TASK}", 1.0)], TASK)
    static = _acc(zoo_models, [("large", 1.0), (f"expert_{TASK}", 1.0), ("small", -1.0)], TASK)
    assert static - large >= 0.5 * (large_ft - large), {"large": large, "static": static, "large_ft": large_ft}


def test_unseen_task_has_an_upper_bound_but_no_expert(zoo_models: dict) -> None:
    for task in tasks.unseen_tasks():
        assert f"expert_{task}" not in zoo_models
        large = _acc(zoo_models, [("large", 1.0)], task)
        large_ft = _acc(zoo_models, [(f"large_ft_{task}", 1.0)], task)
        assert large_ft >= large + 0.2, {"task": task, "large": large, "large_ft": large_ft}
