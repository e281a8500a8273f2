"""Fixtures shared by the unit tests of the engine."""

from __future__ import annotations

import pytest
import torch

from logitfusion.engine.local import LocalRunner
from logitfusion.engine.testing import TINY_FAMILY, TINY_FINGERPRINT, TINY_VOCAB_SIZE, tiny_llama


@pytest.fixture(scope="module")
def models():
    """The tiny random Llama family (engine.testing), built once per module."""
    torch.set_num_threads(1)
    return {name: tiny_llama(spec) for name, spec in TINY_FAMILY.items()}


@pytest.fixture()
def runners(models):
    """A fresh LocalRunner per model of the tiny family (empty caches), closed after the test."""
    rs = {
        name: LocalRunner(m, name=name, vocab_size=TINY_VOCAB_SIZE, vocab_fingerprint=TINY_FINGERPRINT,
                          max_length_tokens=TINY_FAMILY[name].max_length_tokens)
        for name, m in models.items()
    }
    yield rs
    for r in rs.values():
        r.close()


@pytest.fixture(scope="module")
def zoo_runners(request):
    """(zoo paths, a LocalRunner per model the test module names in MODELS) over the committed zoo's checkpoints,
    loaded from disk like any HF model; the module is skipped when no zoo is built."""
    torch.set_num_threads(1)
    from logitfusion.models.zoo.build import ZooNotBuilt, load_zoo

    try:
        paths = load_zoo()
    except ZooNotBuilt as exc:
        pytest.skip(f"zoo not built: {exc}")
    rs = {name: LocalRunner.from_pretrained(paths.model(name), name) for name in request.module.MODELS}
    yield paths, rs
    for r in rs.values():
        r.close()
