"""The committed generated code equals a fresh protoc run, and the generated modules import and round-trip."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from logitfusion import protos_build

pytestmark = pytest.mark.timeout(120)


def test_committed_generated_code_matches_a_fresh_build():
    result = protos_build.check()
    assert result.ok, (
        f"differing={result.differing} missing={result.missing} stale={result.stale}: "
        "run `python -m logitfusion.protos_build`"
    )


def test_every_proto_has_committed_modules_that_import():
    for source in protos_build.proto_sources():
        stem = source.stem
        pb2 = importlib.import_module(f"logitfusion.v1.{stem}_pb2")
        grpc_mod = importlib.import_module(f"logitfusion.v1.{stem}_pb2_grpc")
        assert pb2.DESCRIPTOR.package == "logitfusion.v1"
        assert grpc_mod.__name__.endswith("_pb2_grpc")


def test_worker_messages_round_trip_through_bytes():
    from logitfusion.v1 import worker_pb2 as pb

    req = pb.StepRequest(
        step_id=7,
        extends=[pb.Extend(seq_id="a", token_ids=[1, 2, 3], want_all=True)],
        truncates=[pb.Truncate(seq_id="b", length_tokens=4)],
        releases=["c"],
        logits_dtype=pb.Tensor.DTYPE_BFLOAT16,
    )
    assert pb.StepRequest.FromString(req.SerializeToString()) == req
    service = pb.DESCRIPTOR.services_by_name["Worker"]
    step = service.methods_by_name["Step"]
    assert step.client_streaming and step.server_streaming
    assert set(service.methods_by_name) == {"Step", "Describe", "Sequences"}


def test_check_mode_reports_a_tampered_file(tmp_path):
    fresh = protos_build.generate(tmp_path)
    target = tmp_path / fresh[0]
    target.write_bytes(target.read_bytes() + b"# tampered\n")
    result = protos_build.check(repo_root=tmp_path)
    assert result.differing == (str(fresh[0]),)
    assert not result.missing and not result.stale


def test_check_mode_exits_zero_on_the_committed_tree():
    proc = subprocess.run(
        [sys.executable, "-m", "logitfusion.protos_build", "--check"], capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
