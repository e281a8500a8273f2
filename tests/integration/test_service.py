"""The service end to end: real Ray (embedded, loopback, token auth on), real Ray Serve gRPC ingress on a free port,
real ModelWorker actors and gRPC streams, tiny random Llama checkpoints on disk sharing one real tokenizer.

One module-scoped service (start-up is the expensive part on 2 cores) serves every test; each test leaves it as it
found it: no running request, every worker's sequence table empty (checked with a polling helper, never a sleep).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logitfusion import errors
from logitfusion.client import FusionClient, build_request
from logitfusion.v1 import fusion_pb2 as pb
from logitfusion.v1 import fusion_pb2_grpc

import service_models  # tests/integration/service_models.py
from service_models import wait_for

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

APP = "lftest"
MAX_CONCURRENT = 12
LONG = 1200  # tokens: a generation that is certainly still running when the test interferes with it


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family")
    service_models.write_family(root)
    return root


@pytest.fixture(scope="module")
def service(family):
    from logitfusion.cluster.cli import free_port, run_service

    config = service_models.write_topology(
        family, max_concurrent_requests=MAX_CONCURRENT, max_batch_size=MAX_CONCURRENT
    )
    started_ray = not ray.is_initialized()
    t0 = time.monotonic()
    svc = run_service(config, grpc_port=free_port(), http_port=free_port(), blocking=False, num_cpus=4)
    print(f"\nservice started in {time.monotonic() - t0:.1f} s on {svc.address}")
    try:
        yield svc
    finally:
        from ray import serve

        serve.delete(svc.app_name, _blocking=True)
        # Deleting the application closes the replica's pipeline: its workers are gone too (no leak across apps).
        wait_for(lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True)
                              if a["name"].startswith(f"lf-{APP}-")], what="the pipeline's workers to stop")
        if started_ray:
            svc.shutdown()
        else:
            serve.shutdown()


@pytest.fixture(scope="module")
def client(service):
    with FusionClient(service.address, timeout_s=120.0) as c:
        yield c


@pytest.fixture(scope="module")
def app(service):
    from ray import serve

    return serve.get_app_handle(APP)


@pytest.fixture(scope="module")
def workers(app) -> dict[str, object]:
    return service_models.worker_actors(app)




def worker_sequences(workers) -> dict[str, dict[str, int]]:
    return {m: ray.get(w.sequences.remote(), timeout=30) for m, w in workers.items()}


def assert_idle(app, workers):
    """No running request and every worker's sequence table empty (polled: releases are asynchronous)."""
    wait_for(lambda: not app.stats.remote().result(timeout_s=30)["active_requests"], what="no active request")
    wait_for(lambda: not any(worker_sequences(workers).values()), what="empty sequence tables on every worker")


@pytest.fixture
def idle(app, workers):
    assert_idle(app, workers)
    yield
    assert_idle(app, workers)


def tokens_of(stream) -> list[int]:
    return [t.token_id for t in stream]


# ------------------------------------------------------------------------------------------------ basics


def test_describe_recipes_and_health(client, service):
    d = client.describe()
    assert [m["name"] for m in d["models"]] == ["large", "small", "expert_a", "expert_b"]
    assert {m["vocab_fingerprint"] for m in d["models"]} and len({m["vocab_fingerprint"] for m in d["models"]}) == 1
    assert d["default_preset"] == "dlf_multi" and d["limits"]["max_concurrent_requests"] == MAX_CONCURRENT
    assert d["vocab_size"] == 99 and d["eos_token_id"] == 2
    recipes = {r.name: r for r in client.list_recipes()}
    assert set(recipes) == {"large_base", "proxy_a", "dlf_a", "dlf_multi"}
    assert recipes["dlf_multi"].is_default and recipes["dlf_multi"].solver == "joint"
    assert recipes["proxy_a"].experts == ["expert_a"] and recipes["proxy_a"].alphas == [1.0]
    assert client.health() == "SERVING" and client.health("logitfusion.v1.FusionService") == "SERVING"
    with pytest.raises(errors.NotFound, match="unknown service"):
        client.health("some.other.Service")


def test_health_watch_streams_the_status(service):
    with grpc.insecure_channel(service.address) as ch:
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        first = next(call)
        call.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_generate_equals_the_stream_and_carries_weights(client, idle):
    kw = dict(max_new_tokens=12, stop_at_eos=False, preset="dlf_multi")
    done = client.generate("hello world", **kw)
    stream = client.generate_stream("hello world", **kw)
    events = list(stream)
    assert done.token_ids == [e.token_id for e in events] and len(done.token_ids) == 12
    assert done.text == "".join(e.text for e in events) == stream.completion.text
    assert done.finish_reason == "length" and done.recipe == "dlf_multi"
    assert done.prompt_tokens == len("hello world") + 1  # characters + BOS
    assert len(done.weights) == done.steps == 12
    for w in done.weights:
        assert set(w) == {"expert_a", "expert_b"}
        assert all(0.0 <= a <= 2.0 and math.isfinite(a) for a in w.values())
    # StepWeights.loss: the solved DLF objective at every token, the same on both calls; unset for a static recipe
    assert len(done.losses) == 12 and all(x is not None and 0.0 <= x < 1e3 for x in done.losses)
    assert [e.loss for e in events] == stream.completion.losses
    assert done.losses == pytest.approx(stream.completion.losses, abs=1e-6)
    static = client.generate("hello world", max_new_tokens=3, stop_at_eos=False, preset="proxy_a")
    assert static.losses == [None, None, None]
    assert [e.index for e in events] == list(range(12))


@pytest.mark.parametrize(("preset", "draft", "k", "adaptive"),
                         [("proxy_a", "expert_a", 3, False), ("dlf_multi", "expert_b", 2, True)])
def test_speculative_request_is_token_identical_and_reports_acceptance(client, idle, preset, draft, k, adaptive):
    """docs/algorithms.md §8 through the service: greedy speculative output equals plain output token for token, each
    token carries its own solved weights, and usage reports the draft's acceptance."""
    kw = dict(max_new_tokens=16, stop_at_eos=False, preset=preset)
    plain = client.generate("speculate on this", **kw)
    spec = client.generate("speculate on this", draft_model=draft, num_draft_tokens=k, adaptive_draft=adaptive, **kw)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert spec.drafted_tokens > 0 and 0 <= spec.accepted_tokens <= spec.drafted_tokens
    assert spec.acceptance_rate == spec.accepted_tokens / spec.drafted_tokens and plain.acceptance_rate is None
    assert spec.completion_tokens == 16 and len(spec.weights) == 16  # one weight entry per token, as plain
    assert spec.steps <= 16 and spec.steps + spec.accepted_tokens >= 16
    # the same weights at every position; dlf_multi solves jointly, whose objective is flat near its minimum, so the
    # verify's batch of k + 1 rows (another candidate support per row than plain decoding's) may move an alpha by
    # ~1e-3 at equal loss (test_engine_decoder allows a few hundredths for joint)
    tol = 2e-2 if preset == "dlf_multi" else 1e-3
    for w_spec, w_plain in zip(spec.weights, plain.weights):
        assert w_spec.keys() == w_plain.keys()
        assert all(abs(w_spec[e] - w_plain[e]) < tol for e in w_spec), (w_spec, w_plain)
    stream = client.generate_stream("speculate on this", draft_model=draft, num_draft_tokens=k, **kw)
    events = list(stream)
    assert [e.token_id for e in events] == plain.token_ids and [e.index for e in events] == list(range(16))
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[-1] + 1 == stream.completion.steps
    assert stream.completion.drafted_tokens > 0


def test_token_id_prompt_and_stop_string(client, idle):
    kw = dict(max_new_tokens=4, stop_at_eos=False, preset="large_base")
    prompt_ids = service_models.tokenizer().encode("abc")  # with BOS, as the service encodes text
    assert client.generate(list(prompt_ids), **kw).token_ids == client.generate("abc", **kw).token_ids
    base = client.generate("hello", max_new_tokens=20, stop_at_eos=False, preset="large_base")
    assert len(base.text) >= 10, base
    stop = base.text[-2:]  # a stop string the greedy completion is known to contain
    cut = client.generate("hello", max_new_tokens=20, stop_at_eos=False, preset="large_base", stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index(stop)]


# ------------------------------------------------------------------------------------------------ batching


def test_eight_concurrent_streams_are_token_identical_to_solo_runs(client, app, idle):
    presets = ["dlf_multi", "proxy_a", "large_base", "dlf_a"]
    jobs = [(f"prompt number {i}!", presets[i % 4], 10 + 2 * i) for i in range(8)]
    solo = [
        client.generate(p, max_new_tokens=n, stop_at_eos=False, preset=preset).token_ids for p, preset, n in jobs
    ]
    steps_before = app.stats.remote().result(timeout_s=30)["steps_run"]
    results: dict[int, list[int]] = {}
    joined = [threading.Event() for _ in jobs]

    def run(i: int) -> None:
        p, preset, n = jobs[i]
        stream = iter(client.generate_stream(p, max_new_tokens=n, stop_at_eos=False, preset=preset))
        first = next(stream)
        joined[i].set()  # the next request joins while this one runs
        results[i] = [first.token_id] + [e.token_id for e in stream]

    threads = []
    for i in range(len(jobs)):
        t = threading.Thread(target=run, args=(i,))
        t.start()
        threads.append(t)
        joined[i].wait(60)
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(jobs))] == solo
    steps = app.stats.remote().result(timeout_s=30)["steps_run"] - steps_before
    # Run one after another they would take sum(n) steps; sharing the batch they take far fewer.
    assert steps < sum(n for _, _, n in jobs)


# ------------------------------------------------------------------------------------------------ failures


def test_killed_worker_mid_generation_completes_identically(client, workers, idle):
    kw = dict(max_new_tokens=60, stop_at_eos=False, preset="dlf_multi")
    expected = client.generate("the worker dies", **kw).token_ids
    victim = workers["expert_a"]

    def pid():
        try:
            return ray.get(victim.pid.remote(), timeout=30)
        except ray.exceptions.RayActorError:  # dead, not restarted yet
            return None

    pid_before = pid()
    stream = iter(client.generate_stream("the worker dies", **kw))
    got = [next(stream).token_id for _ in range(5)]
    ray.kill(victim, no_restart=False)  # Ray restarts it (new process, new port); the runner replays its sequences
    got += [e.token_id for e in stream]
    assert got == expected
    assert wait_for(lambda: pid() not in (None, pid_before), what="a restarted worker")


def test_client_cancel_releases_sequences_on_every_worker(client, app, workers, idle):
    stream = client.generate_stream("cancel me", max_new_tokens=LONG, stop_at_eos=False, preset="dlf_multi")
    it = iter(stream)
    next(it), next(it)
    held = worker_sequences(workers)
    assert all(held.values()), held  # every model of the recipe holds the request's sequence now
    stream.cancel()
    with pytest.raises(errors.Cancelled):
        list(it)
    assert_idle(app, workers)


def test_client_process_killed_mid_stream_releases_sequences(service, app, workers, idle):
    """A real disconnect: the client process dies (SIGKILL) while its stream runs; the TCP connection drops."""
    code = (
        "import sys\n"
        "from logitfusion.client import FusionClient\n"
        f"c = FusionClient({service.address!r}, timeout_s=120)\n"
        f"for t in c.generate_stream('killed client', max_new_tokens={LONG}, stop_at_eos=False):\n"
        "    print(t.token_id, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout.readline().strip() and proc.stdout.readline().strip()  # two tokens arrived: it runs
        held = worker_sequences(workers)
        assert all(held.values()), held
    finally:
        proc.kill()
        proc.wait(30)
    assert_idle(app, workers)


def test_client_deadline_releases_sequences_on_every_worker(service, app, workers, idle):
    with FusionClient(service.address, timeout_s=120) as c:
        stream = c.generate_stream("too slow", max_new_tokens=LONG, stop_at_eos=False, timeout_s=3.0)
        got = 0
        with pytest.raises(errors.DeadlineExceeded):
            for _ in stream:
                got += 1
    assert 0 < got < LONG
    assert_idle(app, workers)


def test_more_requests_than_configured_are_refused_at_once(client, service, app, workers, idle):
    streams = [client.generate_stream(f"fill {i}", max_new_tokens=LONG, stop_at_eos=False, preset="large_base")
               for i in range(MAX_CONCURRENT)]
    iters = [iter(s) for s in streams]
    for it in iters:
        next(it)  # every one is admitted and running
    try:
        with FusionClient(service.address, timeout_s=30) as c:
            with pytest.raises(errors.Overloaded) as info:
                c.generate("one too many", max_new_tokens=4)
        assert f"max_concurrent_requests is {MAX_CONCURRENT}" in str(info.value)
        assert client.health() == "SERVING"
    finally:
        for s in streams:
            s.cancel()
    assert_idle(app, workers)
    assert client.generate("after the storm", max_new_tokens=3).completion_tokens == 3


BAD = [
    # (name, request fields, code, words the message must contain)
    ("empty text", dict(prompt=""), "INVALID_ARGUMENT", ["text", "empty"]),
    ("empty ids", dict(prompt=[]), "INVALID_ARGUMENT", ["token_ids.ids", "empty"]),
    ("id out of range", dict(prompt=[1, 500]), "INVALID_ARGUMENT", ["token_ids.ids[1]", "500", "vocab_size=99"]),
    ("negative id", dict(prompt=[-3]), "INVALID_ARGUMENT", ["token_ids.ids[0]", "-3"]),
    ("prompt too long", dict(prompt="x" * 200), "INVALID_ARGUMENT", ["201 tokens", "max_prompt_tokens (128)"]),
    ("zero new tokens", dict(max_new_tokens=0), "INVALID_ARGUMENT", ["max_new_tokens", "0", "1500"]),
    ("too many new tokens", dict(max_new_tokens=10**6), "INVALID_ARGUMENT", ["max_new_tokens", "1000000", "1500"]),
    ("nan temperature", dict(temperature=float("nan")), "INVALID_ARGUMENT", ["sampling.temperature", "nan"]),
    ("inf temperature", dict(temperature=float("inf")), "INVALID_ARGUMENT", ["sampling.temperature", "inf"]),
    ("negative temperature", dict(temperature=-1.0), "INVALID_ARGUMENT", ["sampling.temperature", "-1.0"]),
    ("top_p zero", dict(top_p=0.0), "INVALID_ARGUMENT", ["sampling.top_p", "(0.0, 1.0]"]),
    ("top_p above one", dict(top_p=1.5), "INVALID_ARGUMENT", ["sampling.top_p", "1.5"]),
    ("negative top_k", dict(top_k=-1), "INVALID_ARGUMENT", ["sampling.top_k", "-1"]),
    ("unknown preset", dict(preset="nope"), "INVALID_ARGUMENT", ["recipe.preset", "'nope'", "dlf_multi"]),
    ("unknown expert", dict(experts=["expert_z"]), "INVALID_ARGUMENT", ["recipe.experts[0]", "expert_z"]),
    ("expert that is no expert", dict(experts=["large"]), "INVALID_ARGUMENT", ["recipe.experts[0]", "'large'"]),
    ("unknown method", dict(method="magic"), "INVALID_ARGUMENT", ["recipe.method", "magic"]),
    ("unknown solver", dict(solver="magic"), "INVALID_ARGUMENT", ["recipe.solver", "magic"]),
    ("nan alpha", dict(preset="proxy_a", alphas=[float("nan")]), "INVALID_ARGUMENT", ["recipe.alphas.0", "finite"]),
    ("inf alpha", dict(preset="proxy_a", alphas=[float("inf")]), "INVALID_ARGUMENT", ["recipe.alphas.0", "finite"]),
    ("alpha out of range", dict(preset="proxy_a", alphas=[3.0]), "INVALID_ARGUMENT", ["alphas[0]", "max_alpha=2.0"]),
    ("alpha count", dict(preset="proxy_a", alphas=[1.0, 1.0]), "INVALID_ARGUMENT", ["alphas", "one per expert"]),
    ("negative alpha", dict(preset="proxy_a", alphas=[-0.5]), "INVALID_ARGUMENT", ["alphas[0]", "-0.5"]),
    ("nan beta", dict(method="eft_up", experts=["expert_a"], beta=float("nan")), "INVALID_ARGUMENT",
     ["recipe.beta", "finite"]),
    ("beta too big", dict(method="eft_up", experts=["expert_a"], beta=50.0), "INVALID_ARGUMENT", ["recipe.beta", "10"]),
    ("lambda out of range", dict(method="lambda_interp", experts=["expert_a", "expert_b"], interp_lambda=1.5),
     "INVALID_ARGUMENT", ["recipe.interp_lambda", "1"]),
    ("max_alpha zero", dict(max_alpha=0.0), "INVALID_ARGUMENT", ["recipe.max_alpha", "0"]),
    ("empty stop", dict(stop=[""]), "INVALID_ARGUMENT", ["stop[0]", "max_stop_string_chars"]),
    ("too many stops", dict(stop=["a"] * 9), "INVALID_ARGUMENT", ["stop", "max_stop_strings (8)"]),
    ("long request id", dict(request_id="r" * 200), "INVALID_ARGUMENT", ["request_id", "max_request_id_chars (128)"]),
    ("oversized message", dict(prompt="y" * 70_000), "RESOURCE_EXHAUSTED",
     ["bytes exceed", "max_message_bytes (65536)"]),
    ("unknown draft model", dict(draft_model="drafty"), "INVALID_ARGUMENT",
     ["speculative.draft_model", "'drafty'", "expert_a"]),
    ("zero draft tokens", dict(draft_model="expert_a", num_draft_tokens=0), "INVALID_ARGUMENT",
     ["speculative.num_draft_tokens", "0", "max_draft_tokens"]),
    ("too many draft tokens", dict(draft_model="expert_a", num_draft_tokens=99), "INVALID_ARGUMENT",
     ["speculative.num_draft_tokens", "99", "[1, 8]"]),
    ("draft tokens without a draft model", dict(num_draft_tokens=3), "INVALID_ARGUMENT",
     ["speculative.draft_model"]),
]


@pytest.mark.parametrize("name, fields, code, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_precise_status_naming_field_and_limit(client, name, fields, code, words):
    fields = dict(fields)
    prompt = fields.pop("prompt", "hello")
    with pytest.raises(errors.FusionError) as info:
        client.generate(prompt, **fields)
    assert info.value.code.name == code, str(info.value)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_input_on_the_stream_too(client):
    with pytest.raises(errors.InvalidRequest, match=r"sampling\.top_p"):
        list(client.generate_stream("hello", top_p=2.0))


def test_missing_prompt_and_garbage_bytes(service):
    with grpc.insecure_channel(service.address) as ch:
        stub = fusion_pb2_grpc.FusionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(max_new_tokens=3), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in info.value.details()
        raw = ch.unary_unary("/logitfusion.v1.FusionService/Generate", request_serializer=bytes,
                             response_deserializer=bytes)
        for garbage in (b"\xff\xff\xff\xff\xff\xff", b"\x12\x10abc"):  # a bad tag; a truncated field
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert f"{len(garbage)} bytes are not a valid message" in info.value.details()
            assert "FusionService/Generate" in info.value.details()


def test_after_every_bad_input_the_service_is_serving_and_answers(client, app, workers):
    for _, fields, _, _ in BAD:  # the whole list again, back to back
        fields = dict(fields)
        prompt = fields.pop("prompt", "hello")
        with pytest.raises(errors.FusionError):
            client.generate(prompt, **fields)
    assert client.health() == "SERVING"
    done = client.generate("still fine", max_new_tokens=5, stop_at_eos=False)
    assert done.completion_tokens == 5
    assert_idle(app, workers)


# ------------------------------------------------------------------------------------------------ start-up checks


def test_models_with_different_vocabularies_are_refused_at_start_up(family, tmp_path, service):
    from logitfusion.cluster.launch import Pipeline
    from logitfusion.cluster.topology import load_topology
    from logitfusion.errors import ConfigError

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("large", "small", "expert_a"):
        (bad / name).symlink_to(family / name, target_is_directory=True)
    service_models.write_model(bad / "expert_b", "expert_b", swap_vocab=True)
    topo = load_topology(service_models.write_topology(bad))
    with pytest.raises(ConfigError) as info:
        Pipeline.launch(topo, name_prefix="lf-vocab-test")
    msg = str(info.value)
    assert "'large'" in msg and "'expert_b'" in msg and "first differing id" in msg


def test_ray_token_authentication_is_on(service):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ.get("RAY_AUTH_MODE") == "token" and is_token_auth_enabled()
    assert os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")


# ------------------------------------------------------------------------------------------------ CLI


def test_generate_cli_streams_text_and_weights(service, capsys, idle):
    from logitfusion.cli import build_parser

    args = build_parser().parse_args(
        ["generate", "--address", service.address, "--preset", "dlf_a", "--max-new-tokens", "6", "hi there"]
    )
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "expert weights per token" in err and "expert_a=" in err
    args = build_parser().parse_args(["generate", "--address", service.address, "--preset", "nope", "x"])
    assert args.func(args) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_client_helpers_build_what_they_say():
    req = build_request([1, 2], temperature=0.0, seed=0, preset="p", experts=["e"], alphas=[0.5], stop=["."])
    assert req.WhichOneof("prompt") == "token_ids" and list(req.token_ids.ids) == [1, 2]
    assert req.sampling.HasField("temperature") and req.sampling.HasField("seed") and not req.HasField("max_new_tokens")
    assert list(req.recipe.alphas) == [0.5] and req.recipe.preset == "p" and list(req.stop) == ["."]
