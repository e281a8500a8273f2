"""wire.py: tensors <-> bytes, plans <-> requests, responses -> per-extend logits; every malformed field is named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from google.protobuf.message import DecodeError

from logitfusion import wire
from logitfusion.engine.runner import ExtendOp, RunnerInfo, StepPlan
from logitfusion.v1 import worker_pb2 as pb

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_round_trip_is_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=gen) * 100).to(dtype)
    back = wire.decode_tensor(pb.Tensor.FromString(wire.encode_tensor(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bytes_are_little_endian_row_major():
    msg = wire.encode_tensor(torch.tensor([[1.0, -2.0]]))
    assert msg.data == b"\x00\x00\x80\x3f" + b"\x00\x00\x00\xc0"
    assert list(msg.shape) == [1, 2] and msg.dtype == pb.Tensor.DTYPE_FLOAT32
    bf = wire.encode_tensor(torch.tensor([1.0], dtype=torch.bfloat16))
    assert bf.data == b"\x80\x3f"  # the upper half of fp32 1.0


def test_bf16_keeps_special_values_bit_exact():
    t = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e-40, 3.0e38], dtype=torch.bfloat16)
    back = wire.decode_tensor(wire.encode_tensor(t))
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_encode_converts_and_handles_views_and_scalars():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    col = base[:, 1]  # non-contiguous
    assert torch.equal(wire.decode_tensor(wire.encode_tensor(col)), col)
    half = wire.decode_tensor(wire.encode_tensor(base, torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), base)  # small ints are exact in bf16
    scalar = wire.decode_tensor(wire.encode_tensor(torch.tensor(7, dtype=torch.int64)))
    assert scalar.shape == () and scalar.item() == 7
    empty = wire.decode_tensor(wire.encode_tensor(torch.empty(0, 9)))
    assert empty.shape == (0, 9)


def test_copy_false_shares_the_message_bytes_and_copy_true_owns_memory():
    msg = wire.encode_tensor(torch.ones(4))
    view = wire.decode_tensor(msg, copy=False)
    owned = wire.decode_tensor(msg, copy=True)
    assert torch.equal(view, owned)
    owned += 1  # writable, and it does not touch the message
    assert wire.decode_tensor(msg).tolist() == [1.0] * 4


def test_unsupported_dtype_on_encode_names_the_field():
    with pytest.raises(wire.WireError, match=r"Tensor.dtype: cannot encode torch.float16"):
        wire.encode_tensor(torch.ones(2, dtype=torch.float16))


@pytest.mark.parametrize(
    ("msg", "pattern"),
    [
        (pb.Tensor(dtype=pb.Tensor.DTYPE_FLOAT32, shape=[2, 3], data=b"\x00" * 10), r"10 bytes, but shape \[2, 3\]"),
        (pb.Tensor(dtype=0, shape=[1], data=b"\x00" * 4), r"dtype: unknown dtype code 0"),
        (pb.Tensor(dtype=42, shape=[1], data=b"\x00" * 4), r"unknown dtype code 42"),
        (pb.Tensor(dtype=pb.Tensor.DTYPE_INT64, shape=[-1], data=b""), r"negative dimension"),
        (pb.Tensor(dtype=pb.Tensor.DTYPE_INT64, shape=[1] * 9, data=b"\x00" * 8), r"rank 9 exceeds the limit of 8"),
        # a huge claimed shape with a tiny payload is refused before anything is allocated
        (pb.Tensor(dtype=pb.Tensor.DTYPE_FLOAT32, shape=[2**40, 2**40], data=b"\x00" * 4), r"needs \d+ bytes"),
        (pb.Tensor(dtype=pb.Tensor.DTYPE_BFLOAT16, shape=[3], data=b"\x01\x02\x03"), r"3 bytes, but shape \[3\]"),
    ],
)
def test_malformed_tensors_are_refused_precisely(msg, pattern):
    with pytest.raises(wire.WireError, match=pattern):
        wire.decode_tensor(msg, field="Tensor")


def test_garbage_bytes_never_become_a_tensor():
    with pytest.raises(DecodeError):
        pb.Tensor.FromString(bytes(range(256)) * 3)  # not a message at all
    # well-formed protobuf, nonsense payload: dtype float32, shape [2, 3], data b"hello"
    msg = pb.Tensor.FromString(b"\x08\x01\x12\x02\x02\x03\x1a\x05hello")
    with pytest.raises(wire.WireError, match=r"Tensor.data: 5 bytes, but shape \[2, 3\] of float32 needs 24 bytes"):
        wire.decode_tensor(msg)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen) * 1000).to(dtype)
    assert torch.equal(wire.decode_tensor(wire.encode_tensor(t)), t)


# ------------------------------------------------------------------------------------------------------ plans


def test_plan_round_trips_through_a_request():
    plan = StepPlan(
        extends=(ExtendOp("a", (1, 2, 3), "all"), ExtendOp("b", (4,), "last")),
        truncates=(("c", 2),),
        releases=("d",),
    )
    req = pb.StepRequest.FromString(wire.plan_to_request(plan, 9, "bfloat16").SerializeToString())
    assert req.step_id == 9
    back, dtype = wire.request_to_plan(req)
    assert back == plan and dtype == torch.bfloat16
    _, default_dtype = wire.request_to_plan(pb.StepRequest())
    assert default_dtype == torch.float32


def test_unknown_logits_dtype_name_is_refused():
    with pytest.raises(wire.WireError, match=r"logits_dtype must be one of \['bfloat16', 'float32'\], got 'int8'"):
        wire.plan_to_request(StepPlan(), 0, "int8")


@pytest.mark.parametrize(
    ("req", "pattern"),
    [
        (pb.StepRequest(extends=[pb.Extend(seq_id="", token_ids=[1])]), r"extends\[0\].seq_id: empty seq_id"),
        (pb.StepRequest(extends=[pb.Extend(seq_id="x" * 257, token_ids=[1])]), r"257 characters exceeds .* 256"),
        (
            pb.StepRequest(extends=[pb.Extend(seq_id="a", token_ids=[1]), pb.Extend(seq_id="a", token_ids=[2])]),
            r"extends\[1\].seq_id: 'a' is extended twice",
        ),
        (pb.StepRequest(extends=[pb.Extend(seq_id="a")]), r"extends\[0\].token_ids: empty"),
        (pb.StepRequest(extends=[pb.Extend(seq_id="a", token_ids=[3, -5])]), r"negative token id -5"),
        (pb.StepRequest(truncates=[pb.Truncate(seq_id="a", length_tokens=-1)]), r"truncates\[0\].length_tokens: -1"),
        (pb.StepRequest(releases=["ok", ""]), r"releases\[1\]: empty seq_id"),
        (pb.StepRequest(logits_dtype=pb.Tensor.DTYPE_INT64), r"logits_dtype: int64 is not float32 or bfloat16"),
    ],
)
def test_malformed_requests_are_refused_precisely(req, pattern):
    with pytest.raises(wire.WireError, match=pattern):
        wire.request_to_plan(req)


def test_token_ids_beyond_the_vocabulary_are_refused():
    plan = StepPlan(extends=(ExtendOp("a", (1,)), ExtendOp("b", (2, 50))))
    with pytest.raises(wire.WireError, match=r"extends\[1\].token_ids: token id 50 is outside .* \[0, 50\)"):
        wire.check_plan_limits(plan, vocab_size=50)
    wire.check_plan_limits(plan, vocab_size=51)


# -------------------------------------------------------------------------------------------------- responses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_response_splits_back_per_extend(dtype):
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(1, 7, generator=gen), torch.randn(3, 7, generator=gen)]
    resp = pb.StepResponse.FromString(wire.logits_response(5, parts, dtype, 7).SerializeToString())
    assert resp.step_id == 5 and resp.WhichOneof("outcome") == "logits"
    assert list(resp.logits.logits.shape) == [4, 7]
    out = wire.split_logits(resp.logits, [1, 3], 7)
    assert [o.dtype for o in out] == [torch.float32] * 2
    for got, want in zip(out, parts, strict=True):
        assert torch.equal(got, want.to(dtype).float())


def test_empty_step_has_a_zero_row_tensor():
    resp = wire.logits_response(1, [], torch.float32, 7)
    assert list(resp.logits.logits.shape) == [0, 7]
    assert wire.split_logits(resp.logits, [], 7) == []


def test_split_logits_refuses_mismatches():
    resp = wire.logits_response(1, [torch.zeros(2, 7)], torch.float32, 7)
    with pytest.raises(wire.WireError, match=r"rows_per_extend: got \[2\], the request asked for \[1\]"):
        wire.split_logits(resp.logits, [1], 7)
    with pytest.raises(wire.WireError, match=r"7 columns, the model's vocabulary has 8"):
        wire.split_logits(resp.logits, [2], 8)
    bad = pb.StepLogits(logits=wire.encode_tensor(torch.zeros(2, 7, dtype=torch.int64)), rows_per_extend=[2])
    with pytest.raises(wire.WireError, match=r"expected float32/bfloat16 of shape \[2, V\], got int64"):
        wire.split_logits(bad, [2], 7)


def test_error_response_carries_code_message_and_flag():
    resp = pb.StepResponse.FromString(
        wire.error_response(3, pb.StepError.CODE_INTERNAL, "boom", sequences_changed=True).SerializeToString()
    )
    assert resp.WhichOneof("outcome") == "error" and resp.step_id == 3
    err = resp.error
    assert (err.code, err.message, err.sequences_changed) == (pb.StepError.CODE_INTERNAL, "boom", True)


def test_info_round_trip_and_validation():
    info = RunnerInfo("small", 32, "f" * 64, 128, "float32", "cpu", 1234)
    msg = wire.info_to_proto(info, pid=42)
    assert msg.pid == 42 and wire.info_from_proto(msg) == info
    msg.vocab_size = 0
    with pytest.raises(wire.WireError, match=r"RunnerInfo.vocab_size: 0 is not positive"):
        wire.info_from_proto(msg)


def test_features_travel_with_the_plan_and_the_response():
    plan = StepPlan(extends=(ExtendOp("a", (1, 2, 3), "last", features_tokens=2), ExtendOp("b", (4,), "all")))
    back, _ = wire.request_to_plan(pb.StepRequest.FromString(wire.plan_to_request(plan, 1).SerializeToString()))
    assert back == plan and back.extends[0].features_tokens == 2
    logits = [torch.randn(1, 7), torch.randn(1, 7)]
    feats = [torch.randn(5)]
    resp = wire.logits_response(3, logits + feats, torch.float32, 7, n_extends=2)
    msg = pb.StepResponse.FromString(resp.SerializeToString()).logits
    out = wire.split_logits(msg, [1, 1], 7, expected_features=1)
    assert len(out) == 3 and torch.equal(out[2], feats[0]) and torch.equal(out[0], logits[0])
    with pytest.raises(wire.WireError, match=r"StepLogits.features: expected float32 of shape \[2, H\], got float32 \[1, 5\]"):
        wire.split_logits(msg, [1, 1], 7, expected_features=2)
    plain = pb.StepResponse.FromString(wire.logits_response(3, logits, torch.float32, 7).SerializeToString()).logits
    with pytest.raises(wire.WireError, match="StepLogits.features: missing, the request asked for 1 feature rows"):
        wire.split_logits(plain, [1, 1], 7, expected_features=1)


def test_features_tokens_beyond_the_appended_tokens_are_refused():
    req = pb.StepRequest(extends=[pb.Extend(seq_id="a", token_ids=[1, 2], features_tokens=3)])
    with pytest.raises(wire.WireError, match=r"StepRequest.extends\[0\].features_tokens: 3 exceeds the 2 appended"):
        wire.request_to_plan(req)
