"""Faults the Coordinator must contain, without Ray: a model that answers NaN or +inf logits.

Fault injection by a wrapping runner (vLLM's evil forward): the real tiny model runs, then chosen results are
poisoned, so the worker-side state (the KV cache the step extended) is exactly what a broken checkpoint would leave.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future
from dataclasses import replace

import pytest
import torch

from logitfusion.actors.coordinator import Coordinator, NonFiniteLogits, check_finite_logits
from logitfusion.engine.runner import ModelRunner, RunnerInfo, StepPlan
from logitfusion.engine.testing import TINY_FAMILY, tiny_runner
from logitfusion.errors import InternalError, to_status

from test_service_coordinator import (  # same directory
    CODEC,
    DEFAULT_LIMITS,
    LARGE,
    LONG,
    MODELS,
    idle,
    request,
    tokens,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


class PoisonRunner(ModelRunner):
    """Answers the real logits, except that the next ``poison(n, value)`` results get ``value`` in one row."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._poison: list[float] = []

    def poison(self, times: int, value: float = float("nan")) -> None:
        with self._lock:
            self._poison.extend([value] * times)

    def describe(self) -> RunnerInfo:
        return self.inner.describe()

    def submit(self, plan: StepPlan) -> Future:
        out: Future = Future()

        def done(f: Future) -> None:
            try:
                logits = f.result()
            except BaseException as exc:  # noqa: BLE001
                out.set_exception(exc)
                return
            with self._lock:
                value = self._poison.pop(0) if self._poison and logits else None
            if value is not None:
                logits = [t.clone() for t in logits]
                logits[0][-1, 7] = value
            out.set_result(logits)

        self.inner.submit(plan).add_done_callback(done)
        return out

    def sequences(self) -> dict[str, int]:
        return self.inner.sequences()

    def close(self) -> None:
        self.inner.close()


def test_the_finite_check_names_the_model_and_lets_masked_tokens_through():
    ok = torch.zeros(2, 5)
    ok[0, 1] = float("-inf")  # a masked token is a legitimate logit
    check_finite_logits("large", [ok, torch.zeros(0, 5)])
    for value, words in ((float("nan"), "1 NaN, 0 +inf"), (float("inf"), "0 NaN, 1 +inf")):
        bad = ok.clone()
        bad[1, 3] = value
        with pytest.raises(NonFiniteLogits, match=re.escape(f"model 'expert_b' returned non-finite logits ({words}")):
            check_finite_logits("expert_b", [ok, bad])


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_fail_only_the_requests_reading_that_model_with_internal(value):
    runners = {n: PoisonRunner(tiny_runner(n, replace(TINY_FAMILY[n], max_length_tokens=4096))) for n in MODELS}
    c = Coordinator(runners, codec=CODEC, limits=DEFAULT_LIMITS)
    try:
        expected_large = tokens(c.submit(request("ref", n=40, recipe=LARGE)))
        fused = c.submit(request("fused", n=LONG))
        alone = c.submit(request("alone", n=40, recipe=LARGE))
        next(iter(fused))
        runners["expert_b"].poison(1, value)
        with pytest.raises(InternalError, match="model 'expert_b' returned non-finite logits") as info:
            tokens(fused)
        code, details = to_status(info.value)
        assert code.name == "INTERNAL" and "expert_b" in details
        assert tokens(alone) == expected_large  # a request that never reads expert_b is untouched
        wait_for(lambda: idle(c), what="released sequences")
        assert c.alive()  # the loop goes on: the service stays SERVING
        assert len(tokens(c.submit(request("again", n=5)))) == 5  # and the model serves the next request
    finally:
        c.close()
