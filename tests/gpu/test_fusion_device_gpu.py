"""Fusion and the DLF solve on the GPU (Decoder(fusion_device="cuda")): greedy output equal to the full-recompute
reference fused on the CPU, for every recipe, plain and speculative. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig
from logitfusion.engine.local import LocalRunner
from logitfusion.engine.reference import naive_decode
from logitfusion.engine.testing import TINY_FAMILY, TINY_FINGERPRINT, TINY_VOCAB_SIZE, tiny_decode, tiny_llama
from logitfusion.fusion import presets

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 17, 3], [40, 41, 42, 43, 44, 45, 46, 47], [9]]
RECIPES = {
    "proxy": presets.proxy_tuning("large", "small", "expert_a"),
    "dlf_grid": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="grid"),
    "dlf_newton": presets.dlf("large", "small", ["expert_a"], solver="newton"),
    "dlf_joint": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="joint"),
}


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_fused_on_the_gpu_equals_the_cpu_reference(kind) -> None:
    models = {name: tiny_llama(spec) for name, spec in TINY_FAMILY.items()}
    runners = {n: LocalRunner(m, name=n, vocab_size=TINY_VOCAB_SIZE, vocab_fingerprint=TINY_FINGERPRINT)
               for n, m in models.items()}
    recipe = RECIPES[kind]
    dec = Decoder(runners, decode_fn=tiny_decode, fusion_device="cuda")
    reqs = [GenerationRequest(f"r{i}", p, recipe, max_new_tokens=10, stop_token_ids=()) for i, p in enumerate(PROMPTS)]
    reqs += [GenerationRequest(f"s{i}", p, recipe, max_new_tokens=10, stop_token_ids=(),
                               speculative=SpeculativeConfig("expert_a", 3)) for i, p in enumerate(PROMPTS)]
    for req, res in zip(reqs, dec.generate(reqs)):
        ref = naive_decode(models, req.prompt_ids, recipe, vocab_size=TINY_VOCAB_SIZE, max_new_tokens=10)
        assert res.token_ids == ref.token_ids, (kind, req.request_id)
    for r in runners.values():
        r.close()
