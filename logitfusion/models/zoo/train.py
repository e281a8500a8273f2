"""Deterministic CPU training of the zoo's Llama models: pre-training on the world's prose, fine-tuning on one task.

Determinism: the model is initialised under ``torch.manual_seed(spec.init_seed)``, the data come from
``random.Random`` streams seeded by the recipe, batches are built in a fixed order, and training runs on one torch
thread (set by the caller, see ``build``), so the same recipe gives the same weights on the same machine.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from logitfusion.models.zoo.recipe import FinetuneSpec, ModelSpec, PretrainSpec
from logitfusion.models.zoo.tokenizer import BOS, EOS, PAD, UNK
from logitfusion.models.zoo.world import Item, World, pretraining_sentences

log = logging.getLogger(__name__)

IGNORE = -100  # label id that carries no loss


@dataclass(frozen=True)
class TrainReport:
    """What one training run did."""

    steps: int
    tokens: int  # non-padding input tokens seen
    first_loss: float
    last_loss: float  # mean loss of the last 10% of steps
    wall_s: float


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return int(math.ceil(vocab_size / multiple) * multiple)


def llama_config(spec: ModelSpec, tokenizer: Tokenizer) -> LlamaConfig:
    """The Llama config of ``spec`` for ``tokenizer`` (config.vocab_size padded to ``spec.vocab_pad_multiple``)."""
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"ModelSpec.hidden_size {spec.hidden_size} must be divisible by num_heads {spec.num_heads}")
    return LlamaConfig(
        vocab_size=padded_vocab_size(tokenizer.get_vocab_size(), spec.vocab_pad_multiple),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        use_cache=True,
    )


def init_model(spec: ModelSpec, tokenizer: Tokenizer) -> LlamaForCausalLM:
    """A freshly initialised model; the same spec gives the same weights."""
    torch.manual_seed(spec.init_seed)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    model.generation_config.pad_token_id = tokenizer.token_to_id(PAD)
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- data ---------------------------------------------------------------------------------------------------------


def encoded_sentences(world: World, tokenizer: Tokenizer, rng: random.Random, chunk: int = 256) -> Iterator[list[int]]:
    """The pre-training sentence stream as token ids (no BOS), encoded in chunks for speed."""
    stream = pretraining_sentences(world, rng)
    while True:
        for enc in tokenizer.encode_batch([next(stream) for _ in range(chunk)], add_special_tokens=False):
            yield enc.ids


def pretraining_batches(world: World, tokenizer: Tokenizer, spec: PretrainSpec) -> Iterator[torch.Tensor]:
    """``spec.steps`` batches of packed rows ``[batch_rows, seq_len_tokens]``: BOS + whole sentences + PAD.

    Sentences are separated by nothing or (10%) by a newline token; a sentence that does not fit starts the next row.
    """
    rng = random.Random(spec.data_seed)
    sentences = encoded_sentences(world, tokenizer, random.Random(spec.data_seed + 7919))
    pad, bos = tokenizer.token_to_id(PAD), tokenizer.token_to_id(BOS)
    newline = tokenizer.token_to_id("\n")
    pending = next(sentences)
    for _ in range(spec.steps):
        rows = torch.full((spec.batch_rows, spec.seq_len_tokens), pad, dtype=torch.long)  # [B, T]
        for r in range(spec.batch_rows):
            row = [bos]
            while len(row) + len(pending) <= spec.seq_len_tokens:
                row.extend(pending)
                if rng.random() < 0.1 and len(row) < spec.seq_len_tokens:
                    row.append(newline)
                pending = next(sentences)
            rows[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        yield rows


def pretraining_labels(rows: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token labels for packed rows: every non-PAD token is a target."""
    labels = rows.clone()  # [B, T]
    labels[rows == pad_id] = IGNORE
    return labels


def encode_items(items: Sequence[Item], tokenizer: Tokenizer) -> list[tuple[list[int], int]]:
    """(BOS + prompt + answer + EOS ids, index where the answer starts) per item."""
    eos = tokenizer.token_to_id(EOS)
    prompts = tokenizer.encode_batch([it.prompt for it in items])  # adds BOS
    answers = tokenizer.encode_batch([it.answer for it in items], add_special_tokens=False)
    out = []
    for p, a, it in zip(prompts, answers, items, strict=True):
        if tokenizer.token_to_id(UNK) in p.ids + a.ids:
            raise ValueError(f"item {it.key!r} has a word outside the vocabulary: {it.prompt!r} {it.answer!r}")
        out.append((p.ids + a.ids + [eos], len(p.ids)))
    return out


def finetune_batches(
    items: Sequence[Item],
    tokenizer: Tokenizer,
    spec: FinetuneSpec,
    replay: Callable[[], list[int]] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``spec.steps`` batches of (input_ids [B, T], labels [B, T]); loss only on answer + EOS (and replay rows).

    Items are visited in epochs, each a seeded shuffle. A ``replay_fraction`` of every batch is pre-training
    sentences (full loss), drawn from ``replay``.
    """
    if not items:
        raise ValueError("finetune_batches: no items to train on")
    pad = tokenizer.token_to_id(PAD)
    encoded = encode_items(items, tokenizer)
    rng = random.Random(spec.data_seed)
    order: list[int] = []
    n_replay = round(spec.replay_fraction * spec.batch_rows) if replay is not None else 0
    for _ in range(spec.steps):
        seqs: list[tuple[list[int], int]] = []
        for _ in range(spec.batch_rows - n_replay):
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            seqs.append(encoded[order.pop()])
        for _ in range(n_replay):
            seqs.append((replay(), 1))  # type: ignore[misc]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # [B, T]
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)  # [B, T]
        for r, (s, start) in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            labels[r, start : len(s)] = torch.tensor(s[start:])
        yield ids, labels


def replay_source(world: World, tokenizer: Tokenizer, seed: int) -> Callable[[], list[int]]:
    """A callable giving BOS + one pre-training sentence (ids) per call, from a seeded stream."""
    stream = pretraining_sentences(world, random.Random(seed))
    bos = tokenizer.token_to_id(BOS)

    def next_row() -> list[int]:
        return [bos] + tokenizer.encode(next(stream), add_special_tokens=False).ids

    return next_row


# ---- the loop -----------------------------------------------------------------------------------------------------


def lm_loss(model: LlamaForCausalLM, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]."""
    logits = model(input_ids=ids).logits  # [B, T, Vpad]
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), Vpad]
    target = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    return F.cross_entropy(pred, target, ignore_index=IGNORE)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``peak * min_ratio``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(
    model: LlamaForCausalLM,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float,
    weight_decay: float,
    label: str,
    pad_id: int,
    progress: bool = True,
) -> TrainReport:
    """AdamW over ``batches``; logs loss every ~10% of the steps."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    model.train()
    t0 = time.monotonic()
    losses: list[float] = []
    tokens = 0
    every = max(1, steps // 10)
    for step, (ids, labels) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps, min_lr_ratio)
        loss = lm_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        tokens += int((ids != pad_id).sum())
        if progress and ((step + 1) % every == 0 or step + 1 == steps):
            log.info(
                "%s step %d/%d loss %.4f (%.0f tok/s)",
                label,
                step + 1,
                steps,
                sum(losses[-every:]) / len(losses[-every:]),
                tokens / max(1e-9, time.monotonic() - t0),
            )
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return TrainReport(
        steps=len(losses),
        tokens=tokens,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=sum(tail) / len(tail) if tail else float("nan"),
        wall_s=time.monotonic() - t0,
    )


def pretrain(
    model: LlamaForCausalLM, world: World, tokenizer: Tokenizer, spec: PretrainSpec, *, label: str, progress: bool
) -> TrainReport:
    pad = tokenizer.token_to_id(PAD)
    batches = ((rows, pretraining_labels(rows, pad)) for rows in pretraining_batches(world, tokenizer, spec))
    return train_loop(
        model,
        batches,
        steps=spec.steps,
        lr=spec.lr,
        warmup_steps=spec.warmup_steps,
        min_lr_ratio=spec.min_lr_ratio,
        weight_decay=spec.weight_decay,
        label=label,
        pad_id=pad,
        progress=progress,
    )


def finetune(
    model: LlamaForCausalLM,
    world: World,
    items: Sequence[Item],
    tokenizer: Tokenizer,
    spec: FinetuneSpec,
    *,
    label: str,
    progress: bool,
) -> TrainReport:
    replay = replay_source(world, tokenizer, spec.data_seed + 1000) if spec.replay_fraction > 0 else None
    return train_loop(
        model,
        finetune_batches(items, tokenizer, spec, replay),
        steps=spec.steps,
        lr=spec.lr,
        warmup_steps=spec.warmup_steps,
        min_lr_ratio=spec.min_lr_ratio,
        weight_decay=spec.weight_decay,
        label=label,
        pad_id=tokenizer.token_to_id(PAD),
        progress=progress,
    )
