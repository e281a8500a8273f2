"""LocalRunner: one Hugging Face causal LM in this process, with a KV cache per sequence and batched steps.

A step's extends are grouped by their number of new tokens n. Each group runs ONE forward: the past caches of its
rows are left-padded to a common length, an attention mask hides the padding and every row gets its own position
ids, so a padded row computes exactly what it would compute alone. After the forward the grown cache is split back
into per-sequence caches without the padding.

The decode group (n = 1, every running sequence) usually has the same members step after step. Its padded batch
is kept as it is (the "pack") while the membership does not change, so a steady decode step pads nothing: the
cache just grows by one column. A truncate, a release or a change of membership dissolves the pack into per-row
views, and the next forward pads afresh.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitfusion.engine.lean import LeanLlama, unsupported_reason
from logitfusion.engine.runner import (
    ExtendOp,
    ModelRunner,
    RunnerError,
    RunnerInfo,
    RunnerUnavailable,
    StepPlan,
    failed,
    resolved,
)

logger = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each [b, H_kv, L, D]
# Sliding-window layers keep a full cache here (the model's mask applies the window), so the same padding and
# splitting serve them; recurrent or linear-attention layers have no per-token cache to pad and are refused.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class _Pack:
    """The decode group's padded batch, kept between steps while its membership is unchanged."""

    seq_ids: tuple[str, ...]  # row order
    layers: list[KV]  # per layer: [B, H_kv, L_pad, D]
    mask: torch.Tensor  # [B, L_pad] long, 1 = real token, 0 = left padding
    lengths: list[int]  # real cached tokens per row


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers: padding, splitting and masks
# ----------------------------------------------------------------------------------------------------------------


def left_pad_caches(rows: Sequence[list[KV] | None]) -> tuple[list[KV], list[int]]:
    """Stack per-row caches into one left-padded batch cache.

    rows[b]: per layer (k, v) of shape [1, H, L_b, D], or None for a row with no past (L_b = 0); at least one row
    has a past. Returns the per-layer batch (k, v) of shape [B, H, L_max, D] (zeros in the padding) and the L_b.
    """
    lengths = [0 if r is None else r[0][0].shape[-2] for r in rows]
    l_max = max(lengths)
    first = next(r for r in rows if r is not None)
    out: list[KV] = []
    for layer, (k0, v0) in enumerate(first):
        k_all = k0.new_zeros((len(rows), k0.shape[1], l_max, k0.shape[-1]))  # [B, H, L_max, D]
        v_all = v0.new_zeros((len(rows), v0.shape[1], l_max, v0.shape[-1]))
        for b, r in enumerate(rows):
            if r is not None and lengths[b]:
                k_all[b, :, l_max - lengths[b] :] = r[layer][0][0]
                v_all[b, :, l_max - lengths[b] :] = r[layer][1][0]
        out.append((k_all, v_all))
    return out, lengths


def split_rows(layers: Sequence[KV], lengths: Sequence[int]) -> list[list[KV]]:
    """Per-row views of a left-padded batch cache without the padding: row b -> per layer [1, H, L_b, D]."""
    l_pad = layers[0][0].shape[-2]
    return [
        [(k[b : b + 1, :, l_pad - n :], v[b : b + 1, :, l_pad - n :]) for k, v in layers]
        for b, n in enumerate(lengths)
    ]


def padding_mask(lengths: Sequence[int], l_pad: int) -> torch.Tensor:
    """[B, l_pad] long mask: 1 on the last lengths[b] columns of row b, 0 on its left padding."""
    cols = torch.arange(l_pad).unsqueeze(0)  # [1, l_pad]
    starts = torch.tensor([l_pad - n for n in lengths]).unsqueeze(1)  # [B, 1]
    return (cols >= starts).long()


def row_positions(lengths: Sequence[int], n_new: int) -> torch.Tensor:
    """[B, n_new] position ids of the new tokens: each row continues from its own cached length."""
    return torch.tensor(lengths).unsqueeze(1) + torch.arange(n_new).unsqueeze(0)


def _cache_of(layers: Sequence[KV] | None):
    """A transformers DynamicCache holding the given per-layer tensors as they are (no copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for k, v in layers or ():
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def _layers_of(cache) -> list[KV]:
    """Per-layer (keys, values) of a DynamicCache after a forward."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pool_features(ops: Sequence[ExtendOp], hidden: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """hidden: [B, n, H] last hidden state of the group's new positions -> out[seq_id] = fp32 [H] mean, for the
    ops that ask for features (the prompt representation a routed recipe compares, docs/algorithms.md §6)."""
    for b, op in enumerate(ops):
        if op.features_tokens:
            out[op.seq_id] = hidden[b, : op.features_tokens].float().mean(dim=0).cpu()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The vocabulary fingerprint of a tokenizer (logitfusion.models.vocab)."""
    from logitfusion.models import vocab

    return vocab.vocab_fingerprint(tokenizer)


BACKENDS = ("auto", "lean", "hf")


def _make_lean(model: Any, name: str, max_length_tokens: int, vocab_size: int, backend: str) -> LeanLlama | None:
    """The lean forward for ``model`` when the backend allows it; "auto" falls back to hf with a log line."""
    if backend == "hf":
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        if backend == "lean":
            raise ValueError(f"backend='lean' for model {name!r}: {reason}")
        logger.info("model %s: Hugging Face forward (%s)", name, reason)
        return None
    try:
        lean = LeanLlama(model, max_length_tokens)
        diff = lean.self_check(model, vocab_size)
    except Exception as exc:  # noqa: BLE001 - auto falls back on anything the lean forward cannot do
        if backend == "lean":
            raise ValueError(f"backend='lean' for model {name!r}: {exc}") from None
        logger.warning("model %s: Hugging Face forward (%s)", name, exc)
        return None
    logger.debug("model %s: lean forward, self-check max |diff| %.2e", name, diff)
    return lean  # the check's tokens in slot 0 are never read: a sequence attends to its own positions only


# ----------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------


class LocalRunner(ModelRunner):
    """An in-process model behind the runner contract.

    model: a transformers causal LM with attention layers only (full or sliding window: Llama, Gemma 3, ...).
    vocab_size: the tokenizer's real size V (logits are sliced to it). vocab_fingerprint: the tokenizer's
    fingerprint (logitfusion.models.vocab). max_length_tokens: defaults to the model's
    max_position_embeddings. backend: "lean" runs the model's weights through engine.lean (a slot KV cache and
    no framework overhead: Llama-family models), "hf" through the Hugging Face forward with per-sequence
    DynamicCaches, "auto" (default) takes lean when the architecture allows it and its one-time self-check against
    the Hugging Face forward passes, else hf. threaded: run each plan on the runner's own worker thread so that
    the Decoder's submits to several runners overlap; off by default, because in one process the GIL serialises
    the Python side of every forward and the hand-off costs more than it overlaps (bench/peer.py measures both;
    models step truly in parallel as separate worker processes, actors/worker.py). reuse_pack (hf backend): keep
    the decode group's padded batch between steps while its membership is unchanged.
    """

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        vocab_size: int,
        vocab_fingerprint: str,
        max_length_tokens: int | None = None,
        backend: str = "auto",
        threaded: bool = False,
        reuse_pack: bool = True,
    ) -> None:
        config = model.config
        embed_rows = model.get_input_embeddings().weight.shape[0]
        if not 0 < vocab_size <= embed_rows:
            raise ValueError(f"vocab_size={vocab_size} must be in 1..{embed_rows} (the model's embedding rows)")
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        if max_length_tokens is None:
            if limit <= 0:
                raise ValueError(f"model {name!r} has no max_position_embeddings: pass max_length_tokens")
            max_length_tokens = limit
        if max_length_tokens <= 0:
            raise ValueError(f"max_length_tokens={max_length_tokens} must be > 0")
        layer_types = getattr(config, "layer_types", None) or ()
        odd = sorted({t for t in layer_types if t not in ATTENTION_LAYER_TYPES})
        if odd:
            raise ValueError(
                f"model {name!r} has {odd} layers; LocalRunner serves attention layers only {ATTENTION_LAYER_TYPES}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
        model.eval()
        param = next(model.parameters())
        self._model = model
        self._lean = _make_lean(model, name, int(max_length_tokens), int(vocab_size), backend)
        self.backend = "lean" if self._lean is not None else "hf"
        self._info = RunnerInfo(
            name=name,
            vocab_size=int(vocab_size),
            vocab_fingerprint=vocab_fingerprint,
            max_length_tokens=int(max_length_tokens),
            dtype=str(param.dtype).removeprefix("torch."),
            device=str(param.device),
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        self._device = param.device
        self._reuse_pack = reuse_pack
        self._lock = threading.Lock()  # guards the cache tables against sequences()/close() from other threads
        self._caches: dict[str, list[KV] | None] = {}  # seq_id -> per-layer [1, H, L, D]; None while in the pack
        self._lengths: dict[str, int] = {}  # seq_id -> cached tokens
        self._pack: _Pack | None = None
        self._slot_of: dict[str, int] = {}  # lean backend: seq_id -> its cache slot
        self._free_slots: list[int] = []  # lean backend: a heap of released slots (lowest first keeps rows contiguous)
        self._next_slot = 0
        self._closed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"runner-{name}") if threaded else None
        self.stats = {"forwards": 0, "repacks": 0, "pack_reuses": 0, "busy_s": 0.0}  # busy_s: wall time in plans
        self.tokenizer: Any = None  # set by from_pretrained

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        name: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        gguf_file: str | None = None,
        vocab_fingerprint: str | None = None,
        max_length_tokens: int | None = None,
        **kwargs: Any,
    ) -> LocalRunner:
        """Load a local checkpoint (models.loading) and wrap it; the tokenizer is kept as ``runner.tokenizer``."""
        from logitfusion.models.loading import load_model

        loaded = load_model(path, dtype=dtype, device=device, gguf_file=gguf_file, name=name)
        runner = cls(
            loaded.model,
            name=name,
            vocab_size=loaded.vocab_size,
            vocab_fingerprint=vocab_fingerprint or tokenizer_fingerprint(loaded.tokenizer),
            max_length_tokens=max_length_tokens or loaded.max_length_tokens,
            **kwargs,
        )
        runner.tokenizer = loaded.tokenizer
        return runner

    # ------------------------------------------------------------------------------------------------ contract

    def describe(self) -> RunnerInfo:
        return self._info

    def submit(self, plan: StepPlan) -> Future:
        if self._closed:
            return failed(RunnerUnavailable(f"runner {self._info.name!r} is closed"))
        if self._executor is None:
            return self._run_to_future(plan)
        return self._executor.submit(self._run, plan)

    def sequences(self) -> dict[str, int]:
        with self._lock:
            return dict(self._lengths)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._caches.clear()
            self._lengths.clear()
            self._pack = None
            self._slot_of.clear()
            self._lean = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------------ one plan

    def _run_to_future(self, plan: StepPlan) -> Future:
        try:
            return resolved(self._run(plan))
        except BaseException as exc:  # noqa: BLE001 - the future carries it to the caller
            return failed(exc)

    def _run(self, plan: StepPlan) -> list[torch.Tensor]:
        """Releases, then truncates, then the extends grouped by their number of new tokens."""
        t0 = time.perf_counter()
        try:
            return self._run_plan(plan)
        finally:
            self.stats["busy_s"] += time.perf_counter() - t0

    def _run_plan(self, plan: StepPlan) -> list[torch.Tensor]:
        self._validate(plan)
        with self._lock:
            for seq_id in plan.releases:
                self._release(seq_id)
            for seq_id, length in plan.truncates:
                self._truncate(seq_id, length)
        out: list[torch.Tensor | None] = [None] * len(plan.extends)
        groups = self._groups(plan.extends)
        features: dict[str, torch.Tensor] = {}  # seq_id -> [H], for the extends that ask (runner contract)
        with torch.inference_mode():
            for n_new, idx in groups.items():
                ops = [plan.extends[i] for i in idx]
                if self._lean is not None:
                    logits = self._extend_group_lean(ops, features)
                else:
                    logits = self._extend_group(ops, n_new, features)
                for i in idx:
                    out[i] = logits[plan.extends[i].seq_id]
        return out + [features[op.seq_id] for op in plan.extends if op.features_tokens]  # type: ignore[return-value]

    def _groups(self, extends: Sequence[ExtendOp]) -> dict[int, list[int]]:
        """Extend indices per forward. hf: one group per number of new tokens n. lean: the decode rows (n = 1) and
        every longer extend (prefills, verifies) together, right-padded, unless the padding would run past
        max_length_tokens for some row (then those go by n as well)."""
        groups: dict[int, list[int]] = {}
        if self._lean is None:
            for i, op in enumerate(extends):
                groups.setdefault(len(op.token_ids), []).append(i)
            return groups
        multi = [i for i, op in enumerate(extends) if len(op.token_ids) > 1]
        n_max = max((len(extends[i].token_ids) for i in multi), default=0)
        limit = self._info.max_length_tokens
        for i, op in enumerate(extends):
            n = len(op.token_ids)
            fits = n > 1 and self._lengths.get(op.seq_id, 0) + n_max <= limit
            groups.setdefault(-1 if fits else n, []).append(i)  # -1: the padded group of longer extends
        return groups

    def _validate(self, plan: StepPlan) -> None:
        """Check every op against the state the plan will meet, before anything changes."""
        name, limit, vocab = self._info.name, self._info.max_length_tokens, self._info.vocab_size
        with self._lock:
            after = plan.apply(self._lengths, name)  # refuses bad truncates and a sequence extended twice
        for op in plan.extends:
            if not op.token_ids:
                raise RunnerError(f"{name}: extend of {op.seq_id!r} has no token_ids")
            if op.want not in ("last", "all"):
                raise RunnerError(f"{name}: extend of {op.seq_id!r} has want={op.want!r}, expected 'last' or 'all'")
            if not 0 <= op.features_tokens <= len(op.token_ids):
                raise RunnerError(
                    f"{name}: extend of {op.seq_id!r} has features_tokens={op.features_tokens} outside "
                    f"0..{len(op.token_ids)} (its new tokens)"
                )
            bad = [t for t in op.token_ids if not 0 <= t < vocab]
            if bad:
                raise RunnerError(f"{name}: extend of {op.seq_id!r} has token id {bad[0]} outside 0..{vocab - 1}")
            if after[op.seq_id] > limit:
                raise RunnerError(
                    f"{name}: extend of {op.seq_id!r} to {after[op.seq_id]} tokens exceeds max_length_tokens={limit}"
                )

    # ------------------------------------------------------------------------------------------------ cache ops

    def _dissolve_pack(self) -> None:
        """Turn the pack back into per-row views (no copy)."""
        pack, self._pack = self._pack, None
        if pack is None:
            return
        for seq_id, layers in zip(pack.seq_ids, split_rows(pack.layers, pack.lengths)):
            self._caches[seq_id] = layers

    def _release(self, seq_id: str) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            heapq.heappush(self._free_slots, slot)
        if self._pack is not None and seq_id in self._pack.seq_ids:
            self._dissolve_pack()
        self._caches.pop(seq_id, None)
        self._lengths.pop(seq_id, None)

    def _truncate(self, seq_id: str, length: int) -> None:
        if length == self._lengths[seq_id]:
            return
        if self._lean is not None:
            self._lengths[seq_id] = length  # the slot's positions past length are overwritten by the next extend
            return
        if self._pack is not None and seq_id in self._pack.seq_ids:
            self._dissolve_pack()
        layers = self._caches[seq_id]
        if length == 0 or layers is None:
            self._caches[seq_id] = None
        else:
            self._caches[seq_id] = [(k[:, :, :length], v[:, :, :length]) for k, v in layers]
        self._lengths[seq_id] = length

    def _slot(self, seq_id: str) -> int:
        """The lean cache slot of a sequence, taking the lowest free one for a new sequence."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
            else:
                slot, self._next_slot = self._next_slot, self._next_slot + 1
            self._slot_of[seq_id] = slot
        return slot

    def _extend_group_lean(
        self, ops: list[ExtendOp], features: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The lean backend's forward for a group: rows in slot order, so a steady batch reads its cache in place.
        The ops with ``features_tokens`` also put their prompt features, fp32 [H], into ``features``."""
        with self._lock:
            rows = sorted(((self._slot(op.seq_id), op) for op in ops), key=lambda r: r[0])
            starts = [self._lengths.get(op.seq_id, 0) for _, op in rows]
        keep = [op.rows for _, op in rows]
        pool = [op.features_tokens for _, op in rows] if features is not None else None
        pooled: list[torch.Tensor] = []
        out = self._lean.forward([s for s, _ in rows], starts, [op.token_ids for _, op in rows], keep,
                                 pool=pool if pool and any(pool) else None, pooled_out=pooled)
        self.stats["forwards"] += 1
        logits = out[..., : self._info.vocab_size].float().cpu().split(keep)  # per row [keep_b, V]
        results: dict[str, torch.Tensor] = {}
        with self._lock:
            for b, (_, op) in enumerate(rows):
                self._lengths[op.seq_id] = starts[b] + len(op.token_ids)
                results[op.seq_id] = logits[b]
        for (_, op), f in zip(rows, pooled):
            if op.features_tokens:
                features[op.seq_id] = f  # type: ignore[index]
        return results

    def _extend_group(
        self, ops: list[ExtendOp], n_new: int, features: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """One forward for every op of the group; returns seq_id -> fp32 [n or 1, V] CPU logits. The ops with
        ``features_tokens`` also put the mean of their first new positions' last hidden state, fp32 [H], into
        ``features``."""
        seq_ids = tuple(op.seq_id for op in ops)
        pack = self._pack
        reuse = pack is not None and set(pack.seq_ids) == set(seq_ids)
        if reuse:
            seq_ids = pack.seq_ids  # the pack's row order
            by_id = {op.seq_id: op for op in ops}
            ops = [by_id[s] for s in seq_ids]
            past, lengths, mask = pack.layers, pack.lengths, pack.mask
            self.stats["pack_reuses"] += 1
        else:
            if pack is not None and set(pack.seq_ids) & set(seq_ids):
                self._dissolve_pack()
            past, lengths, mask = self._pad(seq_ids)
        batch = len(ops)
        input_ids = torch.tensor([op.token_ids for op in ops], dtype=torch.long, device=self._device)  # [B, n]
        positions = row_positions(lengths, n_new).to(self._device)  # [B, n]
        keep = n_new if any(op.want == "all" for op in ops) else 1
        full_mask = None
        if mask is not None:
            full_mask = torch.cat([mask, mask.new_ones((batch, n_new))], dim=1).to(self._device)  # [B, L_pad + n]
        cache = _cache_of(past)
        want_features = features is not None and any(op.features_tokens for op in ops)
        out = self._model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
            output_hidden_states=want_features,
        )
        self.stats["forwards"] += 1
        if want_features:
            _pool_features(ops, out.hidden_states[-1], features)  # type: ignore[arg-type]
        new_layers = _layers_of(out.past_key_values)
        new_lengths = [n + n_new for n in lengths]
        self._store(seq_ids, new_layers, new_lengths, full_mask, n_new)
        logits = out.logits[..., : self._info.vocab_size].float().cpu()  # [B, keep, V]
        results: dict[str, torch.Tensor] = {}
        for b, op in enumerate(ops):
            rows = logits[b] if op.want == "all" else logits[b, -1:]  # [n or 1, V]
            results[op.seq_id] = rows.contiguous()
        return results

    def _pad(self, seq_ids: tuple[str, ...]) -> tuple[list[KV] | None, list[int], torch.Tensor | None]:
        """Left-pad the past caches of a group: (per-layer [B, H, L_pad, D] or None, lengths, [B, L_pad] or None)."""
        rows = [self._caches.get(s) for s in seq_ids]
        lengths = [self._lengths.get(s, 0) for s in seq_ids]
        if max(lengths) == 0:
            return None, lengths, None
        if len(rows) == 1:
            return rows[0], lengths, None  # a single row needs no padding and no mask
        self.stats["repacks"] += 1
        layers, _ = left_pad_caches(rows)
        l_pad = max(lengths)
        mask = padding_mask(lengths, l_pad) if min(lengths) < l_pad else None
        return layers, lengths, mask

    def _store(
        self,
        seq_ids: tuple[str, ...],
        layers: list[KV],
        lengths: list[int],
        mask: torch.Tensor | None,
        n_new: int,
    ) -> None:
        """Keep the grown cache: as the pack (decode group) or split back per sequence."""
        with self._lock:
            for s, n in zip(seq_ids, lengths):
                self._lengths[s] = n
            if self._reuse_pack and n_new == 1 and len(seq_ids) > 1:
                if self._pack is not None and set(self._pack.seq_ids) == set(seq_ids):
                    self._pack = None  # superseded by the grown pack of the same rows: no per-row views to rebuild
                else:
                    self._dissolve_pack()
                l_pad = layers[0][0].shape[-2]
                if mask is None:
                    mask = torch.ones((len(seq_ids), l_pad), dtype=torch.long, device=self._device)
                for s in seq_ids:
                    self._caches[s] = None
                self._pack = _Pack(seq_ids=seq_ids, layers=layers, mask=mask, lengths=lengths)
                return
            for s, row in zip(seq_ids, split_rows(layers, lengths)):
                self._caches[s] = row
