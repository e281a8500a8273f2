"""Sampling on the fused distribution: greedy, temperature, top-k, top-p, per-row seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitfusion.fusion import SamplingParams, make_generator, sample, to_probs

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
NEG_INF = float("-inf")


def distinct_logprobs(seed: int, B: int, V: int, scale: float = 2.0) -> torch.Tensor:
    """Log-probs with distinct values in every row (so top-k and top-p supports are unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.randperm(V, generator=g) for _ in range(B)]).float()  # distinct ranks
    z = base * scale / V + torch.rand(B, V, generator=g) * (0.5 * scale / V)  # order kept, spacing varied
    return torch.log_softmax(z, -1)


# ---------------------------------------------------------------------------------------------------------------
# to_probs


def test_greedy_is_a_one_hot_argmax():
    lp = distinct_logprobs(0, 3, 10)
    probs = to_probs(lp, [SamplingParams()] * 3)
    assert torch.equal(probs, torch.nn.functional.one_hot(lp.argmax(-1), 10).float())


@SETTINGS
@given(seed=st.integers(0, 10**6), V=st.integers(2, 50), temperature=st.floats(0.05, 5.0))
def test_temperature_alone_is_a_tempered_softmax(seed, V, temperature):
    lp = distinct_logprobs(seed, 2, V)
    probs = to_probs(lp, [SamplingParams(temperature=temperature)] * 2)
    torch.testing.assert_close(probs, torch.softmax(lp / temperature, -1))


@SETTINGS
@given(seed=st.integers(0, 10**6), V=st.integers(2, 50), k=st.integers(1, 60), temperature=st.floats(0.1, 3.0))
def test_top_k_keeps_exactly_the_k_most_likely(seed, V, k, temperature):
    lp = distinct_logprobs(seed, 3, V)
    probs = to_probs(lp, [SamplingParams(temperature=temperature, top_k=k)] * 3)
    for b in range(3):
        want = set(torch.argsort(lp[b], descending=True)[: min(k, V)].tolist())
        assert set(probs[b].nonzero().flatten().tolist()) == want
        kept = torch.tensor(sorted(want))
        torch.testing.assert_close(probs[b, kept], torch.softmax(lp[b, kept] / temperature, -1))


def _nucleus(p: np.ndarray, top_p: float) -> set[int]:
    """Independent reference: the smallest set of most likely tokens with mass >= top_p (float64)."""
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    n = int(np.searchsorted(cum, top_p - 1e-12)) + 1  # first prefix reaching top_p
    return set(order[: min(n, len(p))].tolist())


@SETTINGS
@given(seed=st.integers(0, 10**6), V=st.integers(2, 50), top_p=st.floats(0.01, 0.99), temperature=st.floats(0.3, 3.0))
def test_top_p_keeps_exactly_the_nucleus(seed, V, top_p, temperature):
    lp = distinct_logprobs(seed, 3, V)
    probs = to_probs(lp, [SamplingParams(temperature=temperature, top_p=top_p)] * 3)
    tempered = torch.softmax(lp.double() / temperature, -1).numpy()
    for b in range(3):
        order = np.sort(tempered[b])[::-1]
        cum = np.cumsum(order)
        if np.min(np.abs(cum - top_p)) < 1e-5:  # top_p sits on a prefix sum: float32 may round either way
            continue
        assert set(probs[b].nonzero().flatten().tolist()) == _nucleus(tempered[b], top_p)
        assert abs(float(probs[b].sum()) - 1.0) < 1e-5


def test_top_k_then_top_p_and_the_off_values():
    lp = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    both = to_probs(lp, [SamplingParams(temperature=1.0, top_k=3, top_p=0.7)])
    # top-k keeps {0, 1, 2} renormalised to (4/9, 3/9, 2/9); top-p 0.7 needs tokens 0 and 1 (7/9 >= 0.7)
    torch.testing.assert_close(both, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))
    off = to_probs(lp, [SamplingParams(temperature=1.0, top_k=0, top_p=1.0)])
    torch.testing.assert_close(off, lp.exp())
    huge_k = to_probs(lp, [SamplingParams(temperature=1.0, top_k=100)])
    torch.testing.assert_close(huge_k, lp.exp())


def test_mixed_rows_get_their_own_parameters():
    lp = distinct_logprobs(7, 3, 20)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=0.5, top_p=0.5)]
    probs = to_probs(lp, params)
    for b in range(3):
        torch.testing.assert_close(probs[b : b + 1], to_probs(lp[b : b + 1], [params[b]]))


def test_masked_tokens_are_never_in_the_support_nor_sampled():
    lp = distinct_logprobs(3, 4, 12)
    lp[:, ::2] = NEG_INF
    lp = torch.log_softmax(lp, -1)
    params = [SamplingParams(temperature=2.0), SamplingParams(temperature=1.0, top_k=11),
              SamplingParams(temperature=5.0, top_p=0.999), SamplingParams()]
    probs = to_probs(lp, params)
    assert (probs[:, ::2] == 0).all() and not torch.isnan(probs).any()
    gens = [make_generator(SamplingParams(seed=i)) for i in range(4)]
    for _ in range(200):
        assert (sample(lp, params, gens) % 2 == 1).all()


# ---------------------------------------------------------------------------------------------------------------
# sample


def test_greedy_sampling_is_argmax_and_draws_nothing():
    lp = distinct_logprobs(1, 2, 30)
    gen = make_generator(SamplingParams(seed=5))
    state = gen.get_state()
    tokens = sample(lp, [SamplingParams(seed=5)] * 2, [gen, gen])
    assert torch.equal(tokens, lp.argmax(-1)) and tokens.dtype == torch.long
    assert torch.equal(gen.get_state(), state)


def _draws(lp: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    gen = make_generator(params)
    return [int(sample(lp, [params], [gen])[0]) for _ in range(n)]


def test_the_same_seed_reproduces_the_same_tokens():
    lp = distinct_logprobs(2, 1, 40, scale=1.0)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    first = _draws(lp, p, 50)
    assert first == _draws(lp, p, 50)
    assert first != _draws(lp, SamplingParams(temperature=1.0, top_p=0.95, seed=1235), 50)
    assert len(set(first)) > 5  # it really samples


@SETTINGS
@given(seed=st.integers(0, 2**64 - 1), mates=st.integers(1, 4), position=st.integers(0, 4))
def test_a_row_samples_the_same_whatever_its_batch_mates(seed, mates, position):
    lp = distinct_logprobs(seed % 1000, 1, 25, scale=1.0)
    me = SamplingParams(temperature=0.8, top_k=20, seed=seed)
    alone = _draws(lp, me, 20)
    others = distinct_logprobs(seed % 997 + 1, mates, 25)
    position = min(position, mates)
    batch = torch.cat([others[:position], lp, others[position:]])
    params = [SamplingParams(temperature=1.0 + i, seed=i) for i in range(mates)]
    params.insert(position, me)
    gens = [make_generator(p) for p in params]
    got = [int(sample(batch, params, gens)[position]) for _ in range(20)]
    assert got == alone


def test_sampled_frequencies_follow_to_probs():
    lp = torch.log(torch.tensor([[0.05, 0.4, 0.0, 0.25, 0.3]]))
    params = SamplingParams(temperature=1.0, top_k=3)
    want = to_probs(lp, [params])[0].numpy()  # (0, 0.4, 0, 0.25, 0.3) renormalised
    n = 6000  # one batch of n rows, each with its own seeded generator
    batch = [SamplingParams(temperature=1.0, top_k=3, seed=i) for i in range(n)]
    tokens = sample(lp.expand(n, -1), batch, [make_generator(p) for p in batch]).numpy()
    freq = np.bincount(tokens, minlength=5) / n
    assert freq[0] == 0 and freq[2] == 0
    assert 0.5 * np.abs(freq - want).sum() < 0.03  # expected ~0.008; a uniform sampler would be ~0.3 off


def test_unseeded_requests_use_the_global_generator():
    assert make_generator(SamplingParams(temperature=1.0)) is None
    lp = distinct_logprobs(4, 2, 10)
    tokens = sample(lp, [SamplingParams(temperature=1.0)] * 2, [None, None])
    assert tokens.shape == (2,) and ((tokens >= 0) & (tokens < 10)).all()


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(temperature=-0.1), "temperature=-0.1: must be finite and >= 0 (0 means greedy)"),
        (SamplingParams(temperature=float("nan")), "temperature=nan: must be finite and >= 0 (0 means greedy)"),
        (SamplingParams(temperature=float("inf")), "temperature=inf: must be finite and >= 0 (0 means greedy)"),
        (SamplingParams(top_k=-1), "top_k=-1: must be an integer >= 0 (0 means off)"),
        (SamplingParams(top_k=2.5), "top_k=2.5: must be an integer >= 0 (0 means off)"),
        (SamplingParams(top_p=0.0), "top_p=0.0: must be in (0, 1] (1 means off)"),
        (SamplingParams(top_p=1.5), "top_p=1.5: must be in (0, 1] (1 means off)"),
        (SamplingParams(top_p=float("nan")), "top_p=nan: must be in (0, 1] (1 means off)"),
        (SamplingParams(seed=-1), "seed=-1: must be None or an integer in [0, 2**64 - 1]"),
        (SamplingParams(seed=2**64), f"seed={2**64}: must be None or an integer in [0, 2**64 - 1]"),
    ],
)
def test_validate_names_the_field_and_the_limit(params, message):
    with pytest.raises(ValueError) as e:
        params.validate()
    assert str(e.value) == message


def test_batch_level_errors():
    lp = distinct_logprobs(0, 2, 5)
    with pytest.raises(ValueError, match="params: 1 entries for a batch of 2 rows"):
        to_probs(lp, [SamplingParams()])
    with pytest.raises(ValueError, match=r"params\[1\].top_p=2.0: must be in \(0, 1\]"):
        to_probs(lp, [SamplingParams(), SamplingParams(top_p=2.0)])
    with pytest.raises(ValueError, match="generators: 1 entries for a batch of 2 rows"):
        sample(lp, [SamplingParams()] * 2, [None])
    bad = lp.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="logprobs: holds NaN"):
        sample(bad, [SamplingParams()] * 2, [None, None])
    dead = lp.clone()
    dead[0] = NEG_INF
    with pytest.raises(ValueError, match="logprobs: row 0 masks every token"):
        to_probs(dead, [SamplingParams()] * 2)
