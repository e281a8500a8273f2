"""Load a causal language model from local disk: a Hugging Face directory or a GGUF file. Never the network.

``load_model(path)`` returns a ``LoadedModel``: the model in eval mode, its tokenizer, and the metadata the runner
contract needs (name, the tokenizer's real vocabulary size, the maximum sequence length). Logits are always sliced to
the tokenizer's real size because ``config.vocab_size`` often carries padding rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: eval mode, on its device, with its tokenizer and limits."""

    name: str  # directory name, or the GGUF file's stem
    path: str  # what was loaded (directory, or the GGUF file)
    model: Any  # a transformers PreTrainedModel (causal LM), eval mode
    tokenizer: Any  # a transformers tokenizer
    vocab_size: int  # len(tokenizer): the real vocabulary; logits are sliced to it
    config_vocab_size: int  # rows of the output layer (>= vocab_size; the rest is padding)
    max_length_tokens: int  # longest sequence (prompt + generated) the model accepts
    dtype: str
    device: str
    num_parameters: int

    @torch.no_grad()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits ``[n, V]`` on the CPU for one sequence of ``n`` token ids (no cache), sliced to V."""
        if len(token_ids) == 0:
            raise ValueError("logits: token_ids must not be empty")
        if len(token_ids) > self.max_length_tokens:
            raise ValueError(
                f"logits: {len(token_ids)} tokens exceed the model's max_length_tokens={self.max_length_tokens}"
            )
        bad = [t for t in token_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"logits: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # [1, n]
        out = self.model(input_ids=ids).logits[0, :, : self.vocab_size]  # [n, V]
        return out.float().cpu()


def _resolve(path: str | Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a directory, a .gguf path, or a directory + ``gguf_file``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    if p.is_file():
        if gguf_file is not None:
            raise ValueError(f"gguf_file={gguf_file!r} given but path {p} is a file, not a directory")
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model path {p} is a file but not a .gguf file; pass a model directory instead")
        return p.parent, p.name
    if gguf_file is not None:
        if not (p / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file does not exist: {p / gguf_file}")
        return p, gguf_file
    if not (p / "config.json").is_file():
        raise ValueError(
            f"{p} is not a Hugging Face model directory: no config.json (for a GGUF checkpoint pass gguf_file=)"
        )
    return p, None


def _check_dtype_device(dtype: str, device: str) -> torch.device:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def _max_length(config: Any, tokenizer: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    raise ValueError("cannot tell the model's maximum length: config has no max_position_embeddings")


def load_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    gguf_file: str | None = None,
    name: str | None = None,
) -> LoadedModel:
    """Load a local causal LM (HF directory, or GGUF: a ``.gguf`` path or ``path`` dir + ``gguf_file``).

    Raises FileNotFoundError when the path (or GGUF file) is missing, ValueError when the directory is not a causal
    language model or an argument is invalid.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    directory, gguf = _resolve(path, gguf_file)
    dev = _check_dtype_device(dtype, device)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{directory}: cannot read a model config: {err}") from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{directory}: model_type {getattr(config, 'model_type', '?')!r} is not a causal language model"
        )
    log.info("loading %s%s as %s on %s", directory, f" ({gguf})" if gguf else "", dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=DTYPES[dtype], local_files_only=True, **extra
    )
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **extra)
    vocab = len(tokenizer)
    rows = model.get_output_embeddings().weight.shape[0]
    if vocab > rows:
        raise ValueError(f"{directory}: tokenizer has {vocab} tokens but the output layer only {rows} rows")
    return LoadedModel(
        name=name or (Path(gguf).stem if gguf else directory.name),
        path=str(directory / gguf) if gguf else str(directory),
        model=model,
        tokenizer=tokenizer,
        vocab_size=vocab,
        config_vocab_size=rows,
        max_length_tokens=_max_length(config, tokenizer),
        dtype=dtype,
        device=str(dev),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
