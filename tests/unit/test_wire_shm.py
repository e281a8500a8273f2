"""Logits in shared memory between a WorkerServer and a RemoteRunner on the same host (actors/shm.py), over real
gRPC on loopback: bit-identical to the in-message path, used only where the client's view of the memory filesystem
is the worker's, at most shm.SLOTS requests out per stream, files removed with their stream and no file left by a
worker, and every path a peer sends checked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from logitfusion import wire
from logitfusion.actors import shm
from logitfusion.actors.remote import RemoteRunner
from logitfusion.actors.worker import WorkerServer
from logitfusion.engine.runner import ExtendOp, StepPlan
from logitfusion.engine.testing import tiny_runner
from logitfusion.v1 import worker_pb2 as pb

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shm.enabled(), reason=f"no writable {shm.SHM_DIR}: shared memory is not offered here"),
]
torch.set_num_threads(1)


def _ext(seq_id: str, tokens, want="last") -> ExtendOp:
    return ExtendOp(seq_id, tuple(tokens), want)


def _ours() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"lf-{os.getpid()}-")}


@pytest.fixture
def pair():
    served, reference = tiny_runner("large", threaded=False), tiny_runner("large", threaded=False)
    srv = WorkerServer(served)
    yield srv, reference
    srv.stop(0)
    served.close()
    reference.close()


def test_logits_come_through_shared_memory_bit_identical_and_files_go_with_their_stream(pair):
    srv, reference = pair
    before = _ours()
    assert srv.servicer.shm_identity == shm.identity() != ""
    rr = RemoteRunner("large", lambda: srv.address)
    try:
        for tokens in ([1, 2, 3], [4], [5]):
            plan = StepPlan(extends=(_ext("a", tokens, "all"), _ext("b", tokens)))
            got, want = rr.step(plan), reference.step(plan)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert srv.servicer.shared_steps == 3
        assert len(_ours() - before) == 2  # the stream's two slots
    finally:
        rr.close()
    assert srv.wait_idle(10)
    assert _ours() == before  # the slots went with the stream, and the worker keeps no other file


def test_the_identity_names_host_filesystem_and_owner():
    boot, dev, ino, uid = shm.identity().rsplit(":", 3)
    st = os.stat(shm.SHM_DIR)
    assert (int(dev), int(ino), int(uid)) == (st.st_dev, st.st_ino, os.getuid()) and len(boot) >= 32
    assert shm.same_memory(str(shm.SHM_DIR), shm.identity())
    assert not shm.same_memory("/tmp", shm.identity())  # another directory
    assert not shm.same_memory(str(shm.SHM_DIR), f"{boot}:{int(dev) + 1}:{ino}:{uid}")  # another tmpfs mount
    assert not shm.same_memory(str(shm.SHM_DIR), f"{'0' * 36}:{dev}:{ino}:{uid}")  # another host
    assert not shm.same_memory(str(shm.SHM_DIR), "")  # not offered


def _in_the_messages(srv: WorkerServer, reference, seq_id: str) -> None:
    """One step through a fresh client: identical logits, none of them through shared memory."""
    rr = RemoteRunner("large", lambda: srv.address)
    try:
        plan = StepPlan(extends=(_ext(seq_id, [1, 2, 3]),))
        assert torch.equal(rr.step(plan)[0], reference.step(plan)[0])
        assert srv.servicer.shared_steps == 0
    finally:
        rr.close()


def test_on_another_host_or_with_shared_memory_off_the_logits_stay_in_the_messages(pair, monkeypatch):
    srv, reference = pair
    monkeypatch.setattr(shm, "same_memory", lambda directory, ident: False)  # a client on another host
    _in_the_messages(srv, reference, "a")
    monkeypatch.undo()
    monkeypatch.setenv("LOGITFUSION_SHM", "0")
    assert not shm.enabled()
    _in_the_messages(srv, reference, "b")


def test_at_most_two_shared_requests_are_out_at_once(pair):
    srv, reference = pair
    rr = RemoteRunner("large", lambda: srv.address)
    try:
        plans = [StepPlan(extends=(_ext(f"s{i}", [i + 1, i + 2], "all"),)) for i in range(5)]
        futures = [rr.submit(p) for p in plans]  # all in flight together
        for f, p in zip(futures, plans):
            assert torch.equal(f.result(timeout=30)[0], reference.step(p)[0])
        assert 2 <= srv.servicer.shared_steps < 5  # the rest came in the messages
    finally:
        rr.close()


def test_a_worker_restart_keeps_shared_memory_and_replays_identically(pair):
    srv, reference = pair
    address = {"now": srv.address}
    rr = RemoteRunner("large", lambda: address["now"], reconnect_timeout_s=20)
    try:
        plan = StepPlan(extends=(_ext("a", [1, 2, 3]),))
        assert torch.equal(rr.step(plan)[0], reference.step(plan)[0])
        srv.stop(0)  # the worker goes away; a fresh server over a fresh runner replaces it
        fresh_runner = tiny_runner("large", threaded=False)
        fresh = WorkerServer(fresh_runner)
        address["now"] = fresh.address
        plan = StepPlan(extends=(_ext("a", [4]),))
        assert torch.equal(rr.step(plan)[0], reference.step(plan)[0])  # replayed [1, 2, 3], then [4]
        assert fresh.servicer.shared_steps >= 1
    finally:
        rr.close()
    fresh.stop(0)
    fresh_runner.close()


def _response(path: str, shape=(1, 97)) -> pb.StepLogits:
    return pb.StepLogits(logits=pb.Tensor(dtype=pb.Tensor.DTYPE_FLOAT32, shape=list(shape)), rows_per_extend=[1],
                         shared_memory_path=path)


def test_every_shared_memory_path_a_peer_sends_is_checked(tmp_path):
    reader = shm.Reader()
    ring = shm.Ring("feed")
    try:
        good = ring.write(torch.arange(97, dtype=torch.float32).view(1, 97))
        (x,) = wire.split_logits(_response(good), [1], 97, shared=reader.read)
        assert torch.equal(x, torch.arange(97, dtype=torch.float32).view(1, 97))
        cases = {
            "/etc/passwd": "not a worker's logits file",
            str(shm.SHM_DIR / "other-file"): "not a worker's logits file",
            str(shm.SHM_DIR / f"lf-{os.getpid()}-feed-0-99"): "cannot open",
            str(tmp_path / os.path.basename(good)): "not a worker's logits file",
        }
        for path, message in cases.items():
            with pytest.raises(wire.WireError, match=message):
                wire.split_logits(_response(path), [1], 97, shared=reader.read)
        with pytest.raises(wire.WireError, match=r"shape \[1, 97\], expected \[1, 98\]"):
            wire.split_logits(_response(good), [1], 98, shared=reader.read)
        big = shm.SHM_DIR / f"lf-{os.getpid()}-feed-1-7"
        big.write_bytes(b"\0" * 16)  # shorter than it claims
        with pytest.raises(wire.WireError, match="16 bytes, the logits need 388"):
            wire.split_logits(_response(str(big)), [1], 97, shared=reader.read)
        with pytest.raises(wire.WireError, match="this client did not ask for shared memory"):
            wire.split_logits(_response(good), [1], 97)
    finally:
        reader.close()
        ring.close()
        (shm.SHM_DIR / f"lf-{os.getpid()}-feed-1-7").unlink(missing_ok=True)
    assert not os.path.exists(good)


def test_files_of_dead_processes_are_swept_and_live_ones_kept():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = shm.SHM_DIR / f"lf-{pid}-abc-0-1"
    live = shm.SHM_DIR / f"lf-{os.getpid()}-abc-0-1"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        assert shm.sweep_stale() >= 1
        assert not stale.exists() and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_a_full_memory_filesystem_sends_the_logits_in_the_message(pair, monkeypatch):
    srv, reference = pair

    def full(path, size):
        raise OSError(28, "No space left on device")  # what posix_fallocate says on a full tmpfs

    monkeypatch.setattr(shm, "_create", full)
    rr = RemoteRunner("large", lambda: srv.address)
    try:
        plan = StepPlan(extends=(_ext("a", [1, 2, 3], "all"),))
        assert torch.equal(rr.step(plan)[0], reference.step(plan)[0])
        assert srv.servicer.shared_steps == 0
    finally:
        rr.close()
