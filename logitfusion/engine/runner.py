"""The runner contract: the one seam between the decode loop and a model, wherever that model lives.

A ModelRunner owns one model and, per sequence id, that model's KV cache. The Decoder talks to every model through
this interface only, so an in-process LocalRunner, a RemoteRunner (gRPC client of a Ray actor) and a test double
plug in interchangeably.

When each call happens:
- ``describe()`` once, at start-up: the Decoder checks vocabularies and limits before any request is admitted.
- ``submit(plan)`` once per decoding step, for every runner concurrently. A plan carries the ops of every live
  sequence for this model, so the runner can do one batched forward per step. Within a plan the order is fixed:
  releases, then truncates, then extends.
- A first extend of an unknown seq_id is its prefill. The chosen token of step n travels as the extend of step n+1.
- ``truncate`` rolls a sequence back (speculative decoding after a rejected draft); ``release`` frees it.

What a runner may assume: seq_ids in one plan are distinct across extends; a truncate never grows a sequence; the
Decoder never submits a second plan before the future of the first has resolved.
What the Decoder may assume: each extend returns fp32 logits ``[n, V]`` on the CPU, sliced to the tokenizer's real
vocabulary size V (never config padding rows); n = 1 for ``want="last"``, n = len(token_ids) for ``want="all"``.
The logits are read-only for the Decoder: they may be views of one batched output or of a received message.
An extend with ``features_tokens = k > 0`` (the prefill of a routed request, docs/algorithms.md §6) also asks for the
mean of the model's last hidden state over its first k appended positions (the prompt): those fp32 ``[H]`` vectors
follow every extend's logits in the result list, one per such extend, in plan order. A runner that cannot give them
returns the logits alone; the Decoder then fails the step with a clear error.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, MutableMapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

import torch

Want = Literal["last", "all"]


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner reports about its model at start-up."""

    name: str  # the model's name in the topology (e.g. "large", "small", "expert_capital")
    vocab_size: int  # V: the tokenizer's real size; logits are sliced to it
    vocab_fingerprint: str  # sha256 over the id->token map and the special tokens (models.vocab)
    max_length_tokens: int  # the longest sequence (prompt + generated) the model accepts
    dtype: str  # e.g. "float32", "bfloat16"
    device: str  # e.g. "cpu", "cuda:0"
    num_parameters: int = 0


class RunnerError(RuntimeError):
    """A runner could not carry out a plan (bad op, over its limits). Not retried."""


class RunnerUnavailable(RuntimeError):
    """The runner's model is gone (worker dead, stream broken) and could not be recovered."""


@dataclass(frozen=True)
class ExtendOp:
    """Append tokens to a sequence's cache and return logits for the last or for all appended positions."""

    seq_id: str
    token_ids: tuple[int, ...]
    want: Want = "last"
    features_tokens: int = 0  # k > 0: also return the mean last hidden state of the first k new positions, fp32 [H]

    @property
    def rows(self) -> int:
        """Rows of this extend's logits: len(token_ids) for want="all", else 1."""
        return len(self.token_ids) if self.want == "all" else 1


@dataclass(frozen=True)
class StepPlan:
    """Everything one model does in one decoding step, for every live sequence at once."""

    extends: tuple[ExtendOp, ...] = ()
    truncates: tuple[tuple[str, int], ...] = ()  # (seq_id, new_length_tokens)
    releases: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (self.extends or self.truncates or self.releases)

    def rows_per_extend(self) -> list[int]:
        """Rows of each extend's logits, in plan order (ExtendOp.rows)."""
        return [e.rows for e in self.extends]

    def apply(self, lengths: Mapping[str, int], name: str = "plan") -> dict[str, int]:
        """The cached lengths (seq_id -> tokens) after this plan, in the contract's order: releases, then truncates,
        then extends. ``lengths`` is not changed. Raises RunnerError, naming ``name`` (the model), for a plan the
        state cannot take: a truncate of an unknown sequence or one that would grow it, a sequence extended twice.
        Checks that need the model (vocabulary, maximum length) are the runner's."""
        after = dict(lengths)
        for seq_id in self.releases:
            after.pop(seq_id, None)
        for seq_id, length in self.truncates:
            if seq_id not in after:
                raise RunnerError(f"{name}: truncate of unknown seq_id {seq_id!r}")
            if not 0 <= length <= after[seq_id]:
                raise RunnerError(
                    f"{name}: truncate of {seq_id!r} to length {length} outside 0..{after[seq_id]} "
                    "(its cached length); a truncate never grows a sequence"
                )
            after[seq_id] = length
        seen: set[str] = set()
        for op in self.extends:
            if op.seq_id in seen:
                raise RunnerError(f"{name}: seq_id {op.seq_id!r} extended twice in one plan")
            seen.add(op.seq_id)
            after[op.seq_id] = after.get(op.seq_id, 0) + len(op.token_ids)
        return after

    def apply_tokens(self, histories: MutableMapping[str, list[int]], name: str = "plan") -> None:
        """Apply this plan to token histories (seq_id -> tokens) in place, by the same rules and with the same
        errors as ``apply``; on an error nothing changes. In place because a history is long and a step changes
        little of it."""
        after = self.apply({seq_id: len(h) for seq_id, h in histories.items()}, name)
        for seq_id in histories.keys() - after.keys():
            del histories[seq_id]
        added = {op.seq_id: op.token_ids for op in self.extends}
        for seq_id, length in after.items():
            new = added.get(seq_id, ())
            history = histories.setdefault(seq_id, [])
            del history[length - len(new):]  # a truncate; all of it for a sequence released and extended again
            history.extend(new)


def concat_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat(rows) for [n_i, V] matrices, without the copy when they already lie back to back in one buffer (a
    runner's batched output split per sequence, in the same order): at V = 128k and 16 rows that copy is 8 MB per
    model per step."""
    first = rows[0]
    if len(rows) == 1:
        return first
    V = first.shape[-1]
    storage, offset, n = first.untyped_storage().data_ptr(), first.storage_offset(), 0
    for r in rows:
        if (r.dim() != 2 or r.shape[-1] != V or r.stride() != (V, 1) or r.dtype != first.dtype
                or r.untyped_storage().data_ptr() != storage or r.storage_offset() != offset + n * V):
            return torch.cat(list(rows))
        n += r.shape[0]
    return first.as_strided((n, V), (V, 1), offset)


def resolved(value: list[torch.Tensor]) -> Future:
    """An already-resolved future, for runners that compute synchronously."""
    fut: Future = Future()
    fut.set_result(value)
    return fut


def failed(exc: BaseException) -> Future:
    """An already-failed future."""
    fut: Future = Future()
    fut.set_exception(exc)
    return fut


class ModelRunner(abc.ABC):
    """One model and its per-sequence KV caches. See the module docstring for the call protocol."""

    @abc.abstractmethod
    def describe(self) -> RunnerInfo:
        """Name, vocabulary fingerprint, limits, dtype and device of the model."""

    @abc.abstractmethod
    def submit(self, plan: StepPlan) -> Future:
        """Start one step; the future resolves to a list with one fp32 ``[n, V]`` tensor per extend, in order, then
        one fp32 ``[H]`` feature vector per extend with ``features_tokens > 0`` (see the module docstring)."""

    def step(self, plan: StepPlan) -> list[torch.Tensor]:
        """Run one step synchronously."""
        return self.submit(plan).result()

    @abc.abstractmethod
    def sequences(self) -> dict[str, int]:
        """Live sequence ids and their cached lengths in tokens (empty when nothing leaks)."""

    def close(self) -> None:
        """Free the model and every cache. Idempotent."""
