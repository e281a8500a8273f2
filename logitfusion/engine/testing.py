"""Tiny random Llama models that share one vocabulary, for tests and benchmarks of the engine (no files, no hub).

A fixed seed per model makes every model reproducible. The initialiser range is wide enough that next-token
distributions are peaked, so greedy decoding has no near-ties that batching noise (~1e-7) could flip.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from logitfusion.engine.runner import ModelRunner, RunnerInfo, StepPlan

TINY_VOCAB_SIZE = 97
# One printable character per token id: a tokenizer double whose decode is exact and invertible.
TINY_ALPHABET = "".join(chr(c) for c in range(33, 33 + TINY_VOCAB_SIZE))
TINY_FINGERPRINT = hashlib.sha256(("tiny-vocab:" + TINY_ALPHABET).encode()).hexdigest()


@dataclass(frozen=True)
class TinySpec:
    """The size of one tiny model."""

    seed: int
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    config_vocab_size: int = 104  # > TINY_VOCAB_SIZE: padding rows, as real checkpoints often have
    max_length_tokens: int = 256
    init_range: float = 0.3


# A family: a large base, a small base, two small experts and a large fine-tuned model.
TINY_FAMILY: dict[str, TinySpec] = {
    "large": TinySpec(seed=11, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96),
    "large_ft": TinySpec(seed=12, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96),
    "small": TinySpec(seed=21, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32),
    "expert_a": TinySpec(seed=22, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32),
    "expert_b": TinySpec(seed=23, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32),
}


def tiny_llama(spec: TinySpec, attn_implementation: str = "sdpa"):
    """A randomly initialised LlamaForCausalLM in eval mode, fp32, on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.config_vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_length_tokens,
        initializer_range=spec.init_range,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_decode(ids: Sequence[int]) -> str:
    """The tokenizer double's decode: one character per id."""
    return "".join(TINY_ALPHABET[i] for i in ids)


def tiny_encode(text: str) -> list[int]:
    """The tokenizer double's encode: the inverse of tiny_decode."""
    return [TINY_ALPHABET.index(c) for c in text]


def tiny_runner(name: str, spec: TinySpec | None = None, **kwargs):
    """A LocalRunner over a tiny model of the family (or of ``spec``)."""
    from logitfusion.engine.local import LocalRunner

    spec = spec or TINY_FAMILY[name]
    return LocalRunner(
        tiny_llama(spec),
        name=name,
        vocab_size=TINY_VOCAB_SIZE,
        vocab_fingerprint=TINY_FINGERPRINT,
        max_length_tokens=spec.max_length_tokens,
        **kwargs,
    )


class StallingRunner(ModelRunner):
    """A test double of a worker that stops answering: once ``armed``, the next plan's future resolves only after
    ``release`` is set (a SIGSTOPped process continued later), with the inner runner's answer, or failing with
    ``error`` when that is set. The inner runner sees nothing until then, as a stopped worker would."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self.armed = False
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.stalled_plans: list[StepPlan] = []

    def describe(self) -> RunnerInfo:
        return self.inner.describe()

    def submit(self, plan: StepPlan) -> Future:
        if not self.armed:
            return self.inner.submit(plan)
        self.armed = False
        self.stalled_plans.append(plan)
        fut: Future = Future()
        threading.Thread(target=self._answer_late, args=(plan, fut), daemon=True).start()
        return fut

    def _answer_late(self, plan: StepPlan, fut: Future) -> None:
        self.release.wait(timeout=300)
        if self.error is not None:
            fut.set_exception(self.error)
            return
        try:
            fut.set_result(self.inner.step(plan))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller like any runner failure
            fut.set_exception(exc)

    def sequences(self) -> dict[str, int]:
        return self.inner.sequences()

    def close(self) -> None:
        self.inner.close()
