"""The edge between worker.proto and the engine: tensors <-> bytes, plans <-> requests, info <-> messages.

Proto types stop here: the worker server converts a StepRequest into a StepPlan before its runner sees it, and the
RemoteRunner converts a StepResponse into plain fp32 tensors before the Decoder sees them.

Tensors travel as raw little-endian bytes with dtype and shape beside them (never ``repeated float``). Decoding
validates everything a peer could get wrong (dtype, rank, dimension sizes, byte length) and raises WireError with a
message naming the field and the limit; nothing in a decoded message is trusted.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence

import torch

from logitfusion.engine.runner import ExtendOp, RunnerInfo, StepPlan, concat_rows
from logitfusion.v1 import worker_pb2 as pb

MAX_RANK = 8  # tensors on this wire are [n, V] logits or 1-d token ids; 8 leaves room without trusting a peer
MAX_SEQ_ID_CHARS = 256

_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: pb.Tensor.DTYPE_FLOAT32,
    torch.bfloat16: pb.Tensor.DTYPE_BFLOAT16,
    torch.int64: pb.Tensor.DTYPE_INT64,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}
_ITEMSIZE_BYTES: dict[int, int] = {pb.Tensor.DTYPE_FLOAT32: 4, pb.Tensor.DTYPE_BFLOAT16: 2, pb.Tensor.DTYPE_INT64: 8}
# bf16 has no numpy dtype: it travels through a 16-bit integer view of the same bits.
_NUMPY_VIEW: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
_LOGITS_DTYPES: dict[str, int] = {"float32": pb.Tensor.DTYPE_FLOAT32, "bfloat16": pb.Tensor.DTYPE_BFLOAT16}
_BIG_ENDIAN_HOST = sys.byteorder == "big"
logger = logging.getLogger(__name__)


class WireError(ValueError):
    """A message from the wire is malformed: wrong dtype, shape, byte length or field value."""


# ---------------------------------------------------------------------------------------------------------- tensors


def dtype_name(code: int) -> str:
    """'float32' for DTYPE_FLOAT32 etc.; the raw number for unknown codes (for error messages)."""
    if code in _FROM_PROTO:
        return str(_FROM_PROTO[code]).removeprefix("torch.")
    return f"unknown dtype code {code}"


def logits_dtype_code(name: str) -> int:
    """The Tensor.DType for a logits dtype name ('float32' or 'bfloat16')."""
    if name not in _LOGITS_DTYPES:
        raise WireError(f"logits_dtype must be one of {sorted(_LOGITS_DTYPES)}, got {name!r}")
    return _LOGITS_DTYPES[name]


def encode_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """A Tensor message holding ``tensor`` (converted to ``dtype`` first when given), row-major little-endian."""
    target = tensor.dtype if dtype is None else dtype
    if target not in _TO_PROTO:
        raise WireError(f"Tensor.dtype: cannot encode {target}; supported: {sorted(map(str, _TO_PROTO))}")
    t = tensor.detach().to(device="cpu", dtype=target).contiguous()
    arr = t.view(_NUMPY_VIEW.get(target, target)).numpy()  # a view, no copy
    if _BIG_ENDIAN_HOST:
        arr = arr.byteswap()
    return pb.Tensor(dtype=_TO_PROTO[target], shape=list(t.shape), data=arr.tobytes())  # the one copy into bytes


def _check_tensor_header(msg: pb.Tensor, field: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """Validate dtype, rank, dimensions and byte length; return the torch dtype and the shape."""
    if msg.dtype not in _FROM_PROTO:
        raise WireError(
            f"{field}.dtype: {dtype_name(msg.dtype)} is not one of float32, bfloat16, int64"
        )
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) > MAX_RANK:
        raise WireError(f"{field}.shape: rank {len(shape)} exceeds the limit of {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape: negative dimension in {list(shape)}")
    expected_bytes = math.prod(shape) * _ITEMSIZE_BYTES[msg.dtype]
    if len(msg.data) != expected_bytes:
        raise WireError(
            f"{field}.data: {len(msg.data)} bytes, but shape {list(shape)} of {dtype_name(msg.dtype)} "
            f"needs {expected_bytes} bytes"
        )
    return _FROM_PROTO[msg.dtype], shape


def decode_tensor(msg: pb.Tensor, *, copy: bool = True, field: str = "Tensor") -> torch.Tensor:
    """The tensor in ``msg``, validated. ``copy=False`` returns a view of the message's bytes (zero-copy, read-only:
    never write to it); ``copy=True`` returns a tensor that owns its memory."""
    dtype, shape = _check_tensor_header(msg, field)
    data = msg.data
    if not data:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # bytes are immutable: torch warns that the view is not writable
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=dtype)  # [prod(shape)], shares memory with `data`
    if _BIG_ENDIAN_HOST:
        view = _NUMPY_VIEW.get(dtype, dtype)
        flat = torch.from_numpy(flat.view(view).numpy().byteswap()).view(dtype)  # byteswap copies
    elif copy:
        flat = flat.clone()
    return flat.view(shape)


# ------------------------------------------------------------------------------------------------- plans / requests


def plan_to_request(
    plan: StepPlan, step_id: int, logits_dtype: str = "float32", shared_memory: bool = False
) -> pb.StepRequest:
    """The StepRequest for one plan (no validation: the worker validates what it receives). shared_memory: the
    client can read the logits from the worker's shared memory (actors/shm.py)."""
    return pb.StepRequest(
        step_id=step_id,
        extends=[
            pb.Extend(seq_id=e.seq_id, token_ids=e.token_ids, want_all=e.want == "all", features_tokens=e.features_tokens)
            for e in plan.extends
        ],
        truncates=[pb.Truncate(seq_id=s, length_tokens=n) for s, n in plan.truncates],
        releases=list(plan.releases),
        logits_dtype=logits_dtype_code(logits_dtype),
        shared_memory=shared_memory,
    )


def _check_seq_id(seq_id: str, field: str) -> str:
    if not seq_id:
        raise WireError(f"{field}: empty seq_id")
    if len(seq_id) > MAX_SEQ_ID_CHARS:
        raise WireError(f"{field}: seq_id of {len(seq_id)} characters exceeds the limit of {MAX_SEQ_ID_CHARS}")
    return seq_id


def request_to_plan(req: pb.StepRequest) -> tuple[StepPlan, torch.dtype]:
    """The StepPlan and the requested logits dtype of a request, after structural checks (limits that depend on
    the model, such as vocabulary size and maximum length, are checked by ``check_plan_limits``)."""
    if req.logits_dtype not in (pb.Tensor.DTYPE_UNSPECIFIED, *_LOGITS_DTYPES.values()):
        raise WireError(f"StepRequest.logits_dtype: {dtype_name(req.logits_dtype)} is not float32 or bfloat16")
    logits_dtype = torch.bfloat16 if req.logits_dtype == pb.Tensor.DTYPE_BFLOAT16 else torch.float32
    extends = []
    seen: set[str] = set()
    for i, e in enumerate(req.extends):
        field = f"StepRequest.extends[{i}]"
        seq_id = _check_seq_id(e.seq_id, f"{field}.seq_id")
        if seq_id in seen:
            raise WireError(f"{field}.seq_id: {seq_id!r} is extended twice in one step")
        seen.add(seq_id)
        if not e.token_ids:
            raise WireError(f"{field}.token_ids: empty (an extend appends at least one token)")
        tokens = tuple(e.token_ids)
        if min(tokens) < 0:
            raise WireError(f"{field}.token_ids: negative token id {min(tokens)}")
        if e.features_tokens > len(tokens):
            raise WireError(
                f"{field}.features_tokens: {e.features_tokens} exceeds the {len(tokens)} appended tokens"
            )
        want = "all" if e.want_all else "last"
        extends.append(ExtendOp(seq_id=seq_id, token_ids=tokens, want=want, features_tokens=int(e.features_tokens)))
    truncates = []
    for i, t in enumerate(req.truncates):
        field = f"StepRequest.truncates[{i}]"
        seq_id = _check_seq_id(t.seq_id, f"{field}.seq_id")
        if t.length_tokens < 0:
            raise WireError(f"{field}.length_tokens: {t.length_tokens} is negative")
        truncates.append((seq_id, int(t.length_tokens)))
    releases = tuple(_check_seq_id(s, f"StepRequest.releases[{i}]") for i, s in enumerate(req.releases))
    return StepPlan(extends=tuple(extends), truncates=tuple(truncates), releases=releases), logits_dtype


def check_plan_limits(plan: StepPlan, vocab_size: int) -> None:
    """Checks that need the model: every token id below the vocabulary size."""
    for i, e in enumerate(plan.extends):
        top = max(e.token_ids)
        if top >= vocab_size:
            raise WireError(
                f"StepRequest.extends[{i}].token_ids: token id {top} is outside the vocabulary [0, {vocab_size})"
            )


# ---------------------------------------------------------------------------------------------------- responses


def logits_response(
    step_id: int, logits: Sequence[torch.Tensor], dtype: torch.dtype, vocab_size: int, n_extends: int | None = None,
    shared: Callable[[torch.Tensor], str] | None = None,
) -> pb.StepResponse:
    """One StepResponse carrying every extend's [n_i, V] logits as one [sum n_i, V] tensor. With ``n_extends``,
    ``logits`` is a runner's whole result: the entries after the first n_extends are [H] feature vectors, sent
    fp32 as StepLogits.features [n, H]. shared: writes the logits tensor into shared memory and returns its file
    (actors/shm.Ring.write); the message then carries only their dtype, shape and that path."""
    feats: Sequence[torch.Tensor] = ()
    if n_extends is not None:
        logits, feats = logits[:n_extends], logits[n_extends:]
    if logits:
        joined = concat_rows([t.reshape(t.shape[0], vocab_size) for t in logits])  # [sum n_i, V], no copy if in order
    else:
        joined = torch.empty(0, vocab_size)  # [0, V]
    rows = [int(t.shape[0]) for t in logits]
    path = ""
    if shared is not None and joined.numel() and dtype in _TO_PROTO and not _BIG_ENDIAN_HOST:
        t = joined.detach().to(device="cpu", dtype=dtype)
        try:
            path = shared(t)
        except OSError as exc:  # e.g. a full memory filesystem: this response carries its logits itself
            logger.warning("shared memory unavailable for a step's logits (%s); sending them in the message", exc)
    if path:
        header = pb.Tensor(dtype=_TO_PROTO[dtype], shape=list(t.shape))
        msg = pb.StepLogits(logits=header, rows_per_extend=rows, shared_memory_path=path)
    else:
        msg = pb.StepLogits(logits=encode_tensor(joined, dtype), rows_per_extend=rows)
    if feats:
        msg.features.CopyFrom(encode_tensor(torch.stack([f.reshape(-1) for f in feats]), torch.float32))  # [n, H]
    return pb.StepResponse(step_id=step_id, logits=msg)


def error_response(step_id: int, code: int, message: str, *, sequences_changed: bool = False) -> pb.StepResponse:
    """A StepResponse reporting why a step failed (and whether the stream's sequences may have changed)."""
    return pb.StepResponse(
        step_id=step_id, error=pb.StepError(code=code, message=message, sequences_changed=sequences_changed)
    )


def split_logits(
    msg: pb.StepLogits, expected_rows: Sequence[int], vocab_size: int, expected_features: int = 0,
    shared: Callable[[str, torch.dtype, tuple[int, ...]], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The per-extend fp32 [n_i, V] tensors of a response, checked against the rows the request asked for, then
    the ``expected_features`` fp32 [H] feature vectors (runner contract). shared: reads logits that came in shared
    memory (actors/shm.Reader.read: path, dtype, shape -> a tensor it owns); None: such a response is refused."""
    rows = [int(r) for r in msg.rows_per_extend]
    if rows != list(expected_rows):
        raise WireError(f"StepLogits.rows_per_extend: got {rows}, the request asked for {list(expected_rows)}")
    if msg.shared_memory_path:
        return _shared_logits(msg, rows, vocab_size, expected_features, shared)
    dtype, shape = _check_tensor_header(msg.logits, "StepLogits.logits")
    if dtype not in (torch.float32, torch.bfloat16) or len(shape) != 2 or shape[0] != sum(rows):
        raise WireError(
            f"StepLogits.logits: expected float32/bfloat16 of shape [{sum(rows)}, V], "
            f"got {dtype_name(msg.logits.dtype)} {list(shape)}"
        )
    if shape[1] != vocab_size:
        raise WireError(f"StepLogits.logits: {shape[1]} columns, the model's vocabulary has {vocab_size}")
    # fp32: a read-only view of the message's bytes (the runner contract's logits are read-only; at V = 128k and 16
    # rows a copy is 8 MB per model per step); bf16: the upcast is the one copy.
    joined = decode_tensor(msg.logits, copy=False, field="StepLogits.logits").float()  # [sum n, V]
    out = list(torch.split(joined, rows, dim=0)) if rows else []
    return out + _split_features(msg, expected_features)


def _shared_logits(
    msg: pb.StepLogits, rows: list[int], vocab_size: int, expected_features: int,
    shared: Callable[[str, torch.dtype, tuple[int, ...]], torch.Tensor] | None,
) -> list[torch.Tensor]:
    if shared is None:
        raise WireError("StepLogits.shared_memory_path: set, but this client did not ask for shared memory")
    if msg.logits.data:
        raise WireError("StepLogits.logits.data: must be empty when shared_memory_path is set")
    if msg.logits.dtype not in (pb.Tensor.DTYPE_FLOAT32, pb.Tensor.DTYPE_BFLOAT16):
        raise WireError(f"StepLogits.logits.dtype: {dtype_name(msg.logits.dtype)} is not float32 or bfloat16")
    shape = tuple(int(d) for d in msg.logits.shape)
    if shape != (sum(rows), vocab_size):
        raise WireError(f"StepLogits.logits: shape {list(shape)}, expected [{sum(rows)}, {vocab_size}]")
    try:
        joined = shared(msg.shared_memory_path, _FROM_PROTO[msg.logits.dtype], shape).float()  # [sum n, V]
    except ValueError as exc:
        raise WireError(str(exc)) from None
    out = list(torch.split(joined, rows, dim=0)) if rows else []
    return out + _split_features(msg, expected_features)


def _split_features(msg: pb.StepLogits, expected: int) -> list[torch.Tensor]:
    """StepLogits.features as ``expected`` fp32 [H] vectors; WireError when its shape disagrees."""
    if not msg.HasField("features"):
        if expected:
            raise WireError(f"StepLogits.features: missing, the request asked for {expected} feature rows")
        return []
    dtype, shape = _check_tensor_header(msg.features, "StepLogits.features")
    if dtype != torch.float32 or len(shape) != 2 or shape[0] != expected:
        raise WireError(
            f"StepLogits.features: expected float32 of shape [{expected}, H], got {dtype_name(msg.features.dtype)} "
            f"{list(shape)}"
        )
    return list(decode_tensor(msg.features, field="StepLogits.features"))


# --------------------------------------------------------------------------------------------------------- info


def info_to_proto(info: RunnerInfo, pid: int) -> pb.RunnerInfo:
    return pb.RunnerInfo(
        name=info.name,
        vocab_size=info.vocab_size,
        vocab_fingerprint=info.vocab_fingerprint,
        max_length_tokens=info.max_length_tokens,
        dtype=info.dtype,
        device=info.device,
        num_parameters=info.num_parameters,
        pid=pid,
    )


def info_from_proto(msg: pb.RunnerInfo) -> RunnerInfo:
    if msg.vocab_size <= 0:
        raise WireError(f"RunnerInfo.vocab_size: {msg.vocab_size} is not positive")
    if msg.max_length_tokens <= 0:
        raise WireError(f"RunnerInfo.max_length_tokens: {msg.max_length_tokens} is not positive")
    return RunnerInfo(
        name=msg.name,
        vocab_size=int(msg.vocab_size),
        vocab_fingerprint=msg.vocab_fingerprint,
        max_length_tokens=int(msg.max_length_tokens),
        dtype=msg.dtype,
        device=msg.device,
        num_parameters=int(msg.num_parameters),
    )
