"""Speculative fused decoding (docs/algorithms.md §8): greedy output identical to plain fused decoding, and sampled
output distributed exactly like it (chi-square over many seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig
from logitfusion.engine.reference import naive_decode
from logitfusion.engine.testing import TINY_VOCAB_SIZE, tiny_decode
from logitfusion.fusion import SamplingParams, presets, to_probs

V = TINY_VOCAB_SIZE
PROMPTS = [[5, 17, 3], [40, 41, 42, 43, 44, 45, 46, 47], [9], [60, 2, 71, 33, 12]]

pytestmark = pytest.mark.timeout(300)


RECIPES = {
    "proxy": presets.proxy_tuning("large", "small", "expert_a"),
    "static2": presets.static("large", "small", ["expert_a", "expert_b"], alphas=[0.7, 1.2]),
    "dlf_grid": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="grid"),
    "dlf_newton": presets.dlf("large", "small", ["expert_a"], solver="newton"),
    "dlf_joint": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="joint"),
}


@pytest.mark.parametrize("kind", sorted(RECIPES))
@pytest.mark.parametrize(
    ("draft", "k", "adaptive"), [("expert_a", 3, False), ("small", 2, True), ("expert_b", 1, False)]
)
def test_greedy_speculative_is_token_identical(models, runners, kind, draft, k, adaptive) -> None:
    recipe = RECIPES[kind]
    spec = SpeculativeConfig(draft, num_draft_tokens=k, adaptive=adaptive, max_draft_tokens=5)
    dec = Decoder(runners, decode_fn=tiny_decode, max_batch_size=8)
    n_new = [9, 12, 7, 10]
    reqs = [GenerationRequest(f"s{i}", p, recipe, max_new_tokens=n, stop_token_ids=(), speculative=spec)
            for i, (p, n) in enumerate(zip(PROMPTS, n_new))]
    plain = GenerationRequest("plain", PROMPTS[0], recipe, max_new_tokens=8, stop_token_ids=())  # same batch
    results = dec.generate(reqs + [plain])
    for req, res in zip(reqs + [plain], results):
        ref = naive_decode(models, req.prompt_ids, recipe, vocab_size=V, max_new_tokens=req.max_new_tokens)
        assert res.token_ids == ref.token_ids, (kind, req.request_id)
        assert res.finish_reason == "length" and len(res.weights) == len(res.token_ids)
        assert res.text == tiny_decode(res.token_ids)
    spec_res = results[:-1]
    assert all(r.num_drafted_tokens > 0 and 0 <= r.num_accepted_tokens <= r.num_drafted_tokens for r in spec_res)
    # every step emits its accepted draft tokens plus one (max_new_tokens caps k, so nothing is cut off)
    assert all(len(r.token_ids) == r.num_steps + r.num_accepted_tokens for r in spec_res)
    assert results[-1].num_drafted_tokens == 0 and results[-1].acceptance_rate is None
    for name, r in runners.items():
        assert r.sequences() == {}, name


def test_speculative_stops_inside_an_accepted_draft(models, runners) -> None:
    recipe = RECIPES["proxy"]
    ref = naive_decode(models, PROMPTS[1], recipe, vocab_size=V, max_new_tokens=14).token_ids
    eos = ref[5]
    dec = Decoder(runners, eos_token_ids=[eos], decode_fn=tiny_decode)
    # the draft model alone as the recipe: every draft is accepted, so the stop lands inside an accepted run
    single = presets.single("expert_a")
    ref_single = naive_decode(models, PROMPTS[1], single, vocab_size=V, max_new_tokens=14).token_ids
    eos_s = ref_single[3]
    res = dec.generate([
        GenerationRequest("a", PROMPTS[1], recipe, max_new_tokens=14, speculative=SpeculativeConfig("expert_a", 4)),
        GenerationRequest("b", PROMPTS[1], single, max_new_tokens=14, stop_token_ids=(eos_s,),
                          speculative=SpeculativeConfig("expert_a", 6)),
    ])
    assert res[0].token_ids == ref[: ref.index(eos) + 1] and res[0].finish_reason == "stop"
    assert res[1].token_ids == ref_single[: ref_single.index(eos_s) + 1]
    assert res[1].num_accepted_tokens == res[1].num_drafted_tokens  # p == q: everything is accepted
    for name, r in runners.items():
        assert r.sequences() == {}, name


def test_speculative_touches_only_the_draft_and_the_recipes_models(runners) -> None:
    dec = Decoder(runners)
    dec.add_request(GenerationRequest("a", PROMPTS[0], RECIPES["proxy"], max_new_tokens=10,
                                      speculative=SpeculativeConfig("expert_b", 3)))
    dec.step()
    assert {n for n, r in runners.items() if r.sequences()} == {"large", "small", "expert_a", "expert_b"}
    assert runners["large_ft"].stats["forwards"] == 0
    dec.abort("a")
    assert all(r.sequences() == {} for r in runners.values())


# ------------------------------------------------------------------------------------------------ distribution


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(dof) by Wilson-Hilferty; z = 3.09 is the one-sided 0.999 normal quantile."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square of counts [V] against probs [V]; bins with expected < min_expected are pooled."""
    n = float(counts.sum())
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("kind", ["proxy", "dlf_newton"])
def test_sampled_speculative_tokens_follow_the_fused_distribution(models, runners, kind) -> None:
    recipe = RECIPES[kind]
    prompt = PROMPTS[3]
    sp = dict(temperature=1.0)
    n = 3000
    dec = Decoder(runners, max_batch_size=n, max_new_tokens_limit=4, max_waiting_requests=n)
    reqs = [GenerationRequest(f"r{i}", prompt, recipe, sampling=SamplingParams(seed=i, **sp), max_new_tokens=2,
                              stop_token_ids=(), speculative=SpeculativeConfig("expert_a", 1)) for i in range(n)]
    results = dec.generate(reqs)
    first = torch.tensor([r.token_ids[0] for r in results])
    # the target: plain fused sampling at the prompt
    ref = naive_decode(models, prompt, recipe, vocab_size=V, max_new_tokens=1)
    p1 = to_probs(ref.step_logprobs[0].unsqueeze(0), [SamplingParams(**sp)])[0]  # [V]
    stat, dof = chi2_stat(torch.bincount(first, minlength=V).double(), p1.double())
    assert stat < chi2_critical(dof), (stat, dof)
    # the test has power: the draft's own distribution q is rejected by the same test
    with torch.inference_mode():
        q_logits = models["expert_a"](input_ids=torch.tensor([prompt])).logits[0, -1, :V]
    q1 = torch.softmax(q_logits.double(), -1)
    assert float(((q1 - p1.double()) ** 2 / p1.double()).sum()) * n > 5 * chi2_critical(dof)
    # the second token after the most frequent first token: either the bonus token of an accepted draft or the next
    # step's token after a replacement; both must follow the fused distribution at prompt + [a]
    a = int(torch.bincount(first).argmax())
    second = torch.tensor([r.token_ids[1] for r in results if r.token_ids[0] == a])
    ref2 = naive_decode(models, prompt + [a], recipe, vocab_size=V, max_new_tokens=1)
    p2 = to_probs(ref2.step_logprobs[0].unsqueeze(0), [SamplingParams(**sp)])[0]
    stat2, dof2 = chi2_stat(torch.bincount(second, minlength=V).double(), p2.double())
    assert len(second) > 200 and stat2 < chi2_critical(dof2), (stat2, dof2, len(second))
    rates = [r.acceptance_rate for r in results]
    assert 0.0 < sum(rates) / n < 1.0  # some drafts accepted, some rejected: both paths ran


def test_adaptive_k_grows_on_accepted_drafts_and_shrinks_on_rejected(models, runners) -> None:
    from logitfusion.engine.decoder import _adapt_k

    cfg = SpeculativeConfig("expert_a", num_draft_tokens=1, adaptive=True, max_draft_tokens=4)
    assert [_adapt_k(k, k, cfg) for k in (1, 2, 4)] == [2, 3, 4]  # all accepted: one more, up to the max
    assert [_adapt_k(4, n, cfg) for n in (0, 1, 2, 3)] == [3, 3, 4, 4]  # fewer than half: one fewer
    assert _adapt_k(1, 0, cfg) == 1
    single = presets.single("expert_a")  # the draft is the target: every draft is accepted
    ref = naive_decode(models, PROMPTS[0], single, vocab_size=V, max_new_tokens=19).token_ids
    dec = Decoder(runners)
    fixed, adaptive = dec.generate([
        GenerationRequest("f", PROMPTS[0], single, max_new_tokens=19, stop_token_ids=(),
                          speculative=SpeculativeConfig("expert_a", num_draft_tokens=1)),
        GenerationRequest("a", PROMPTS[0], single, max_new_tokens=19, stop_token_ids=(), speculative=cfg),
    ])
    assert fixed.token_ids == adaptive.token_ids == ref
    assert fixed.num_steps == 10  # 2 tokens per step (the last step drafts nothing: 1 token)
    assert adaptive.num_steps == 5  # k = 1, 2, 3, 4, 4: 2 + 3 + 4 + 5 + 5 tokens
    assert adaptive.acceptance_rate == 1.0
