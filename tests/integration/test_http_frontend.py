"""The HTTP app without Ray: the Starlette app of cluster.http_app served by uvicorn on loopback, over a Coordinator
of in-process zoo LocalRunners, driven by the real `openai` client.

What the Serve test cannot set up cheaply lives here: a tokenizer WITH a chat template (chat completions, streamed
and not), the bearer token (401 in OpenAI's error JSON, then accepted), admission (429 at once when
max_concurrent_requests are running), and a streaming client that goes away (its sequences are freed).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "s3cret-token"
TEMPLATE = (
    "{% for m in messages %}{{ 'question: ' if m['role'] == 'user' else '' }}{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %} answer:{% endif %}"
)
PRESETS = {
    "dlf_capital": {"method": "dlf", "experts": ["expert_capital"], "solver": "newton"},
    "large_base": {"method": "single", "model": "large"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, stopped by should_exit (no signals in a test process)."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        tick = threading.Event()
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            tick.wait(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def stack():
    import os

    import torch

    from logitfusion.actors.coordinator import Coordinator, TextCodec
    from logitfusion.cluster.http_app import HttpFrontend, build_http_app
    from logitfusion.cluster.serve_app import FusionFrontend
    from logitfusion.cluster.topology import parse_topology
    from logitfusion.eval.run import load_zoo_runners
    from logitfusion.metrics import ServiceMetrics
    from logitfusion.models.zoo.build import load_zoo

    torch.set_num_threads(1)
    topo = parse_topology({
        "models": [{"name": "large", "role": "large", "path": "zoo:large"},
                   {"name": "small", "role": "small", "path": "zoo:small"},
                   {"name": "expert_capital", "role": "expert", "path": "zoo:expert_capital"}],
        "presets": PRESETS, "default_preset": "dlf_capital",
        "limits": {"max_concurrent_requests": 2, "max_batch_size": 2, "max_new_tokens": 200,
                   "default_max_new_tokens": 8, "max_prompt_tokens": 160},
        "serve": {"auth_token_env": "LF_HTTP_TEST_TOKEN"},
    })
    runners = load_zoo_runners(load_zoo(), ["large", "small", "expert_capital"])
    tok = runners["large"].tokenizer
    tok.chat_template = TEMPLATE
    coordinator = Coordinator(runners, codec=TextCodec.from_tokenizer(tok), limits=topo.limits, name="httptest")
    os.environ["LF_HTTP_TEST_TOKEN"] = TOKEN
    try:
        grpc_frontend = FusionFrontend(topo, coordinator)
    finally:
        del os.environ["LF_HTTP_TEST_TOKEN"]
    metrics = ServiceMetrics("httptest", coordinator, presets=list(topo.presets))
    coordinator.observer = metrics
    server = Server(build_http_app(HttpFrontend(topo, coordinator, grpc_frontend, tok, metrics)))
    try:
        yield server, coordinator, runners
    finally:
        server.stop()
        coordinator.close()
        for r in runners.values():
            r.close()


@pytest.fixture
def oai(stack):
    server, coordinator, runners = stack
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    yield client
    tick = threading.Event()
    deadline = time.monotonic() + 30
    while coordinator.active_requests() or any(r.sequences() for r in runners.values()):
        assert time.monotonic() < deadline, "requests or sequences left behind"
        tick.wait(0.02)


def test_chat_completion_through_the_template_matches_the_plain_prompt(oai):
    chat = oai.chat.completions.create(model="dlf_capital", temperature=0, max_tokens=8,
                                       messages=[{"role": "user", "content": "what is the capital of bathebrik?"}])
    plain = oai.completions.create(model="dlf_capital", temperature=0, max_tokens=8,
                                   prompt="question: what is the capital of bathebrik? answer:")
    msg = chat.choices[0].message
    assert msg.role == "assistant" and msg.content == plain.choices[0].text and msg.content
    assert chat.choices[0].finish_reason == plain.choices[0].finish_reason
    parts = list(oai.chat.completions.create(model="dlf_capital", temperature=0, max_tokens=8, stream=True,
                                             messages=[{"role": "user", "content": "what is the capital of "
                                                                                   "bathebrik?"}]))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == msg.content
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].choices[0].finish_reason is not None


def test_chat_input_is_checked_by_name(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="dlf_capital", messages=[{"role": "robot", "content": "x"}])
    assert info.value.body["param"] == "messages[0]"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="dlf_capital", messages=[])
    assert info.value.body["param"] == "messages"


def test_the_bearer_token_is_required(stack, oai):
    server, _, _ = stack
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model="dlf_capital", prompt="x", max_tokens=1)
    assert info.value.status_code == 401 and info.value.body["param"] == "Authorization"
    import requests

    assert requests.get(f"{server.url}/metrics", timeout=30).status_code == 401
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200  # probes need no token
    assert oai.models.list().data[0].id in PRESETS


def test_overload_is_a_429_at_once_and_admission_reopens(stack, oai):
    _, coordinator, _ = stack
    long = {"model": "large_base", "prompt": "question:", "max_tokens": 200,
            "extra_body": {"logitfusion": {"stop_at_eos": False}}}
    streams = [oai.completions.create(stream=True, **long) for _ in range(2)]  # max_concurrent_requests = 2
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            oai.completions.create(model="dlf_capital", prompt="x", max_tokens=1)
        assert time.monotonic() - t0 < 10 and "max_concurrent_requests" in info.value.body["message"]
    finally:
        for s in streams:
            s.close()  # the client goes away mid-stream: the server aborts the request and frees its sequences
    tick = threading.Event()
    deadline = time.monotonic() + 30
    while coordinator.active_requests():
        assert time.monotonic() < deadline
        tick.wait(0.02)
    assert oai.completions.create(model="dlf_capital", prompt="x", max_tokens=1).choices[0].text is not None


def test_echo_joins_prompt_and_completion_as_the_tokenizer_does(oai):
    prompt = "question: what is the capital of bathebrik? answer:"
    plain = oai.completions.create(model="dlf_capital", temperature=0, max_tokens=8, prompt=prompt)
    echoed = oai.completions.create(model="dlf_capital", temperature=0, max_tokens=8, prompt=prompt, echo=True)
    assert plain.choices[0].text and echoed.choices[0].text == f"{prompt} {plain.choices[0].text}"
    assert echoed.choices[0].logprobs is None  # echo alone returns text; log-probs only when asked


def test_a_batch_of_token_id_prompts_answers_one_choice_each(stack, oai):
    _, coordinator, _ = stack
    prompts = ["question: what is the capital of bathebrik? answer:", "question: what is the capital of benun? answer:"]
    ids = [coordinator.codec.encode(p) for p in prompts]
    batch = oai.completions.create(model="dlf_capital", temperature=0, max_tokens=6, prompt=ids, logprobs=2)
    assert [c.index for c in batch.choices] == [0, 1]
    for c, p in zip(batch.choices, prompts):
        solo = oai.completions.create(model="dlf_capital", temperature=0, max_tokens=6, prompt=p)
        assert c.text == solo.choices[0].text
        n = len(c.logprobs.tokens)  # log-probs of the completion only (no echo), each with its top 2
        assert n == solo.usage.completion_tokens and len(c.logprobs.top_logprobs) == n
        assert all(len(t) <= 2 and lp <= 0 for t, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs))
        greedy = [max(t.values()) for t in c.logprobs.top_logprobs]
        assert c.logprobs.token_logprobs == pytest.approx(greedy, abs=1e-6)  # temperature 0: the top token each time


def test_a_batch_converts_its_body_once_and_holds_every_prompt_to_the_limit(stack, oai, monkeypatch):
    from logitfusion.cluster import http_app

    _, coordinator, _ = stack
    ok = coordinator.codec.encode("question: what is the capital of benun? answer:")
    conversions = []
    real = http_app.request_from_pb
    monkeypatch.setattr(http_app, "request_from_pb", lambda *a, **k: (conversions.append(1), real(*a, **k))[1])
    batch = oai.completions.create(model="dlf_capital", temperature=0, max_tokens=2, prompt=[ok, ok])
    assert len(batch.choices) == 2 and batch.choices[0].text == batch.choices[1].text
    assert conversions == [1]  # the body's sampling, stops and recipe: checked once for both choices
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="dlf_capital", max_tokens=1, prompt=[ok, ok * 20])
    assert info.value.body["param"] == "prompt" and "max_prompt_tokens (160)" in info.value.body["message"]


def test_streamed_echo_with_zero_tokens_returns_the_prompt_only(stack, oai):
    _, _, runners = stack
    prompt = "question: what is the capital of benun? answer:"
    parts = list(oai.completions.create(model="dlf_capital", prompt=prompt, max_tokens=0, echo=True, stream=True))
    assert [p.choices[0].text for p in parts] == [prompt] and parts[-1].choices[0].finish_reason == "length"
