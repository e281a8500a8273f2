"""Speculative acceptance (docs/algorithms.md §8): the greedy rule, the stochastic rule's output distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitfusion.fusion import speculative_accept
from logitfusion.fusion.speculative import residual

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


def one_hotish(ids: list[int], V: int) -> torch.Tensor:
    """Rows peaked at ids (not exactly one-hot, so argmax is the only thing the greedy rule may look at)."""
    p = torch.full((len(ids), V), 0.5 / V)
    p[torch.arange(len(ids)), torch.tensor(ids)] += 0.5
    return p / p.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize(
    ("drafted", "expected"),
    [
        ([3, 1], (2, 4)),  # all accepted: the bonus is argmax p[k]
        ([3, 2], (1, 1)),  # second rejected: emit argmax p[1]
        ([0, 1], (0, 3)),  # first rejected: emit argmax p[0], later matches do not count
    ],
)
def test_greedy_accepts_while_the_argmax_matches(drafted, expected):
    p = one_hotish([3, 1, 4], V=6)
    q = torch.softmax(torch.randn(2, 6, generator=torch.Generator().manual_seed(0)), -1)
    assert speculative_accept(p, q, torch.tensor(drafted), greedy=True, generator=None) == expected


def test_greedy_with_no_draft_emits_argmax():
    p = one_hotish([2], V=5)
    assert speculative_accept(p, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), True, None) == (0, 2)


def test_greedy_ignores_q_and_draws_nothing():
    p = one_hotish([1, 1, 0], V=4)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    for q in (torch.full((2, 4), 0.25), one_hotish([3, 3], V=4)):
        assert speculative_accept(p, q, torch.tensor([1, 1]), True, gen) == (2, 0)
    assert torch.equal(gen.get_state(), state)


# ---------------------------------------------------------------------------------------------------------------
# Stochastic


def test_identical_target_and_draft_accept_everything():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 7, generator=g), -1)
    for seed in range(50):
        drafted = torch.multinomial(p[:3], 1, generator=g).flatten()
        n, tok = speculative_accept(p, p[:3].clone(), drafted, False, torch.Generator().manual_seed(seed))
        assert n == 3 and 0 <= tok < 7


def test_a_token_the_target_forbids_is_always_rejected_and_never_the_replacement():
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.6, 0.2, 0.2]])
    for seed in range(100):
        n, tok = speculative_accept(p, q, torch.tensor([0]), False, torch.Generator().manual_seed(seed))
        assert n == 0 and tok in (1, 2)


def test_a_token_the_draft_gave_zero_is_accepted_when_the_target_allows_it():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0]])
    for seed in range(20):
        assert speculative_accept(p, q, torch.tensor([1]), False, torch.Generator().manual_seed(seed)) == (1, 0)


def test_residual_falls_back_to_p_when_p_minus_q_is_all_zero():
    p = torch.tensor([0.25, 0.25, 0.5])
    torch.testing.assert_close(residual(p, p.clone()), p)
    torch.testing.assert_close(residual(p, torch.tensor([0.5, 0.25, 0.25])), torch.tensor([0.0, 0.0, 1.0]))


def test_seeded_generator_is_reproducible_and_consumes_k_plus_one_uniforms():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(4, 9, generator=g), -1)
    q = torch.softmax(torch.randn(3, 9, generator=g), -1)
    drafted = torch.tensor([1, 4, 7])
    results = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(77)
        results.append(speculative_accept(p, q, drafted, False, gen))
        ref = torch.Generator().manual_seed(77)
        torch.rand(4, generator=ref)
        assert torch.equal(gen.get_state(), ref.get_state())
    assert results[0] == results[1]


P0 = torch.tensor([0.10, 0.40, 0.20, 0.25, 0.05])
Q0 = torch.tensor([0.30, 0.10, 0.30, 0.05, 0.25])


def _first_emitted(rule, trials: int) -> np.ndarray:
    """Frequencies of the first emitted token over seeded trials: draft y ~ q, then the acceptance rule."""
    g = torch.Generator().manual_seed(123)
    p1, q1, p2 = (torch.softmax(torch.randn(5, generator=g), -1) for _ in range(3))
    p, q = torch.stack([P0, p1, p2]), torch.stack([Q0, q1])
    counts = np.zeros(5)
    for i in range(trials):
        draft_gen = torch.Generator().manual_seed(10**6 + i)
        drafted = torch.stack([torch.multinomial(q[j], 1, generator=draft_gen)[0] for j in range(2)])
        n, tok = rule(p, q, drafted, False, torch.Generator().manual_seed(i))
        counts[int(drafted[0]) if n >= 1 else tok] += 1
    return counts / trials


def _rule_ignoring_q(p, q, drafted, greedy, generator):
    """A wrong rule (accept with probability p(y), never looking at q): the check below must catch it."""
    u = torch.rand(len(drafted) + 1, generator=generator)
    n = 0
    while n < len(drafted) and u[n] < p[n, drafted[n]]:
        n += 1
    dist = p[n] if n == len(drafted) else residual(p[n], q[n])
    return n, int(torch.multinomial(dist, 1, generator=generator)[0])


def test_the_first_emitted_token_is_distributed_as_the_target():
    trials = 4000
    tv = 0.5 * np.abs(_first_emitted(speculative_accept, trials) - P0.numpy()).sum()
    assert tv < 0.035, tv  # sampling noise alone: ~0.012 at this many trials
    wrong = 0.5 * np.abs(_first_emitted(_rule_ignoring_q, trials) - P0.numpy()).sum()
    assert wrong > 0.07, wrong  # the same check separates a rule that ignores q (expected TV ~0.25)


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.ones(3), torch.ones(2, 3), torch.tensor([0, 1])), r"p: must be a tensor of shape \[k\+1, V\]"),
        ((torch.ones(3, 4), torch.ones(3, 4), torch.tensor([0, 1])), r"q: must have shape \[k, V\] = \[2, 4\]"),
        ((torch.ones(3, 4), torch.ones(2, 4), torch.tensor([0])), r"drafted: must have shape \[k\] = \[2\]"),
        ((torch.ones(3, 4), torch.ones(2, 4), torch.tensor([0.0, 1.0])), "drafted: must hold integer token ids"),
        ((torch.ones(3, 4), torch.ones(2, 4), torch.tensor([0, 4])), r"drafted: token ids must be in \[0, 4\)"),
        ((-torch.ones(3, 4), torch.ones(2, 4), torch.tensor([0, 1])), "p: probabilities must be finite and >= 0"),
        ((torch.ones(3, 4), torch.full((2, 4), float("nan")), torch.tensor([0, 1])), "q: probabilities must be"),
        ((torch.zeros(3, 4), torch.ones(2, 4), torch.tensor([0, 1])), "p: every row must have positive mass"),
        ((torch.ones(3, 4), torch.zeros(2, 4), torch.tensor([0, 1])), "q: every row must have positive mass"),
    ],
)
def test_bad_input_names_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        speculative_accept(*args, greedy=False, generator=None)
