"""The engine on the zoo's trained checkpoints (loaded from disk like any HF model): cached, batched fused decoding,
plain and speculative, is token-identical to the full-recompute reference. Skipped until the zoo is built."""

from __future__ import annotations

import pytest

from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig
from logitfusion.engine.reference import naive_decode
from logitfusion.fusion import presets

pytestmark = pytest.mark.timeout(300)

MODELS = ("small", "large", "expert_capital", "expert_colour", "large_ft_capital")


@pytest.fixture(scope="module")
def zoo(zoo_runners):
    return zoo_runners[1]  # name -> LocalRunner of MODELS


@pytest.fixture(scope="module")
def prompts(zoo):
    from logitfusion.models.zoo import tasks

    tok = zoo["large"].tokenizer
    items = tasks.eval_items("capital", limit=2) + tasks.eval_items("colour", limit=2)
    few_shot = tasks.few_shot_prompt("capital", items[0].prompt, k=2)
    return [tok.encode(it.prompt) for it in items], tok.encode(few_shot)


def models_of(zoo):
    return {name: r._model for name, r in zoo.items()}


def eos_ids(zoo) -> list[int]:
    tok = zoo["large"].tokenizer
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


RECIPES = {
    "single": presets.single("large"),
    "proxy": presets.proxy_tuning("large", "small", "expert_capital"),
    "eft_up": presets.eft_up("large", "small", "expert_capital", beta=1.5),
    "eft_down": presets.eft_down("small", "large", "large_ft_capital"),
    "lambda": presets.lambda_interp("large", "small", "expert_capital", "expert_colour", 0.5),
    "dlf_grid": presets.dlf("large", "small", ["expert_capital", "expert_colour"], solver="grid"),
    "dlf_newton": presets.dlf("large", "small", ["expert_capital"], solver="newton"),
    "dlf_joint": presets.dlf("large", "small", ["expert_capital", "expert_colour"], solver="joint"),
}


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_zoo_fused_decode_matches_reference(zoo, prompts, kind) -> None:
    recipe = RECIPES[kind]
    ids, _ = prompts
    tok = zoo["large"].tokenizer
    dec = Decoder(zoo, eos_token_ids=eos_ids(zoo), decode_fn=tok.decode, max_new_tokens_limit=32)
    reqs = [GenerationRequest(f"r{i}", p, recipe, max_new_tokens=10) for i, p in enumerate(ids)]
    if kind in ("proxy", "dlf_newton"):
        reqs += [GenerationRequest(f"s{i}", p, recipe, max_new_tokens=10,
                                   speculative=SpeculativeConfig("expert_capital", 3)) for i, p in enumerate(ids)]
    results = dec.generate(reqs)
    for req, res in zip(reqs, results):
        ref = naive_decode(models_of(zoo), req.prompt_ids, recipe, vocab_size=zoo["large"].describe().vocab_size,
                           max_new_tokens=10, stop_token_ids=eos_ids(zoo))
        assert res.token_ids == ref.token_ids, (kind, req.request_id, tok.decode(res.token_ids))
        assert res.finish_reason == ref.finish_reason
    for name, r in zoo.items():
        assert r.sequences() == {}, name


def test_zoo_per_model_prompt_few_shot_for_the_large_model(zoo, prompts) -> None:
    ids, few_shot = prompts
    recipe = RECIPES["proxy"]
    dec = Decoder(zoo, eos_token_ids=eos_ids(zoo), decode_fn=zoo["large"].tokenizer.decode)
    res = dec.generate([GenerationRequest("f", ids[0], recipe, max_new_tokens=10, model_prompts={"large": few_shot})])
    ref = naive_decode(models_of(zoo), ids[0], recipe, vocab_size=zoo["large"].describe().vocab_size,
                       max_new_tokens=10, stop_token_ids=eos_ids(zoo), model_prompts={"large": few_shot})
    assert res[0].token_ids == ref.token_ids
