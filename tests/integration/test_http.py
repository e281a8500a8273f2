"""The HTTP ingress end to end: real Ray, real Serve (HTTP proxy and gRPC proxy of one application), real ModelWorker
actors on the committed zoo, and real clients: the `openai` package, plain HTTP for the bad inputs, Prometheus's own
parser for /metrics, and lm-evaluation-harness (`lm-eval run --model local-completions`) on the two capital tasks
defined in logitfusion/eval/harness, offline.

Checks against references computed here, in-process: `logitfusion eval`'s own evaluate_zoo for the generation task,
and the fused log-probs recomputed from LocalRunners + fusion.fuse for echo/logprobs and the multiple-choice task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

import service_models  # tests/integration/service_models.py
from service_models import wait_for, worker_actors

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "logitfusion" / "eval" / "harness"
APP = "lfhttp"
PRESETS = {
    "large_base": {"method": "single", "model": "large"},
    "proxy_capital": {"method": "proxy_tuning", "experts": ["expert_capital"]},  # `logitfusion eval`: static
    "dlf_capital": {"method": "dlf", "experts": ["expert_capital"], "solver": "newton"},  # eval: dlf_newton
}
PROMPT = "question: what is the capital of bathebrik? answer:"
HARNESS_LIMIT = 16


def topology(tmp: Path) -> Path:
    data = {
        "models": [
            {"name": "large", "role": "large", "path": "zoo:large", "num_cpus": 0.25},
            {"name": "small", "role": "small", "path": "zoo:small", "num_cpus": 0.25},
            {"name": "expert_capital", "role": "expert", "path": "zoo:expert_capital", "num_cpus": 0.25},
        ],
        "presets": PRESETS,
        "default_preset": "dlf_capital",
        "limits": {"max_concurrent_requests": 16, "max_batch_size": 16, "max_new_tokens": 64,
                   "default_max_new_tokens": 16, "max_prompt_tokens": 160, "max_message_bytes": 65536,
                   "request_timeout_s": 120},
        "serve": {"app_name": APP, "coordinator_num_cpus": 0.25, "startup_timeout_s": 300},
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with service_models.serving(topology(tmp_path_factory.mktemp("http"))) as svc:
        yield svc


@pytest.fixture(scope="module")
def oai(service):
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def workers(service):
    from ray import serve

    return worker_actors(serve.get_app_handle(APP))




def assert_idle(workers):
    """Every worker's sequence table empty (scored sequences included): nothing leaks."""
    wait_for(lambda: not any(ray.get(w.sequences.remote(), timeout=30) for w in workers.values()),
             what="empty sequence tables on every worker")


@pytest.fixture(scope="module")
def zoo_runners():
    """The same three zoo models in-process, for reference computations."""
    import torch

    from logitfusion.eval.run import load_zoo_runners
    from logitfusion.models.zoo.build import load_zoo

    torch.set_num_threads(1)
    runners = load_zoo_runners(load_zoo(), ["large", "small", "expert_capital"])
    yield runners
    for r in runners.values():
        r.close()


def fused_logprobs(runners, ids, preset: str):
    """Reference: every model extends ``ids`` (all positions), fusion.fuse over the rows -> [n, V] log-probs."""
    import torch

    from logitfusion.cluster.topology import build_recipe, parse_topology
    from logitfusion.engine.runner import ExtendOp, StepPlan

    topo = parse_topology(yaml.safe_load(topology_text()), ROOT)
    recipe = build_recipe(topo.presets[preset], topo, name=preset)
    logits = {}
    for m in recipe.model_names():
        seq = f"ref-{os.getpid()}-{m}-{len(ids)}-{hash(tuple(ids))}"
        logits[m] = runners[m].step(StepPlan(extends=(ExtendOp(seq, tuple(ids), "all"),)))[0]
        runners[m].step(StepPlan(releases=(seq,)))
    from logitfusion.fusion import fuse

    with torch.inference_mode():
        return fuse(logits, recipe).logprobs


def topology_text() -> str:
    return yaml.safe_dump({
        "models": [{"name": "large", "role": "large", "path": "zoo:large"},
                   {"name": "small", "role": "small", "path": "zoo:small"},
                   {"name": "expert_capital", "role": "expert", "path": "zoo:expert_capital"}],
        "presets": PRESETS, "default_preset": "dlf_capital",
    })


# ------------------------------------------------------------------------------------------------ openai client


def test_openai_completion_matches_the_grpc_answer(service, oai, workers):
    from logitfusion.client import FusionClient

    got = oai.completions.create(model="dlf_capital", prompt=PROMPT, max_tokens=8, temperature=0, stop=["\n"])
    with FusionClient(service.address, timeout_s=120) as c:
        ref = c.generate(PROMPT, preset="dlf_capital", max_new_tokens=8, stop=["\n"])
    choice = got.choices[0]
    assert choice.text == ref.text and choice.text  # the same pipeline behind both ingresses
    assert got.usage.completion_tokens == len(ref.token_ids) and got.usage.prompt_tokens == ref.prompt_tokens
    ext = choice.model_extra["logitfusion"]
    assert ext["experts"] == ["expert_capital"] and len(ext["weights"]) == len(ref.token_ids)
    assert [w[0] for w in ext["weights"]] == pytest.approx([w["expert_capital"] for w in ref.weights], abs=1e-5)
    assert_idle(workers)


def test_openai_streaming_gives_the_same_text_and_ends_with_done(service, oai):
    whole = oai.completions.create(model="proxy_capital", prompt=PROMPT, max_tokens=8, temperature=0)
    parts = list(oai.completions.create(model="proxy_capital", prompt=PROMPT, max_tokens=8, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
    text_parts = [p for p in parts if p.choices]
    assert "".join(p.choices[0].text for p in text_parts) == whole.choices[0].text
    assert text_parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = requests.post(f"{service.base_url}/v1/completions", stream=True, timeout=60,
                        json={"model": "proxy_capital", "prompt": PROMPT, "max_tokens": 4, "stream": True})
    lines = [ln for ln in raw.iter_lines() if ln]
    assert raw.headers["content-type"].startswith("text/event-stream") and lines[-1] == b"data: [DONE]"


def test_chat_without_a_chat_template_is_a_clear_400(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="dlf_capital", messages=[{"role": "user", "content": "hi"}])
    err = info.value.body
    assert err["param"] == "model" and "chat template" in err["message"]


def test_echo_logprobs_are_the_fused_distribution_at_every_prompt_position(service, zoo_runners, workers):
    body = {"model": "dlf_capital", "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 3, "temperature": 0}
    got = requests.post(f"{service.base_url}/v1/completions", json=body, timeout=60).json()
    choice = got["choices"][0]
    lp = choice["logprobs"]
    tok = zoo_runners["large"].tokenizer
    prompt_ids = tok(PROMPT)["input_ids"]
    assert len(lp["tokens"]) == len(prompt_ids) + 1 and lp["token_logprobs"][0] is None
    assert got["usage"]["completion_tokens"] == 1
    greedy = int(fused_logprobs(zoo_runners, prompt_ids, "dlf_capital")[-1].argmax())
    assert lp["tokens"][-1] == tok.decode([greedy])
    ids = prompt_ids + [greedy]
    ref = fused_logprobs(zoo_runners, ids, "dlf_capital")  # [n, V]
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=2e-4)
    for i in range(1, len(ids)):  # top-3 of the fused row, best first; greedy completion token = its top-1
        top = sorted(lp["top_logprobs"][i].values(), reverse=True)
        assert top == pytest.approx(ref[i - 1].topk(3).values.tolist()[: len(top)], abs=2e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-6)
    assert len(choice["logitfusion"]["prompt_weights"]) == len(prompt_ids)  # DLF solved at every prompt position
    zero = requests.post(f"{service.base_url}/v1/completions", timeout=60,
                         json={**body, "max_tokens": 0}).json()["choices"][0]
    assert zero["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1] and zero["text"] == PROMPT
    assert_idle(workers)


# ------------------------------------------------------------------------------------------------ bad input


BAD = [
    ("malformed JSON", b'{"prompt": "x",', 400, "body"),
    ("not an object", b"[1, 2]", 400, "body"),
    ("wrong type", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ("wrong type max_tokens", {"prompt": PROMPT, "max_tokens": 2.5}, 400, "max_tokens"),
    ("unknown preset", {"model": "gpt-9", "prompt": PROMPT}, 400, "model"),
    ("n=2", {"prompt": PROMPT, "n": 2}, 400, "n"),
    ("max_tokens over the limit", {"prompt": PROMPT, "max_tokens": 100000}, 400, "max_tokens"),
    ("max_tokens 0 without echo", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("token id outside the vocabulary", {"prompt": [1, 2, 999999]}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("missing prompt", {"model": "dlf_capital"}, 400, "prompt"),
    ("unknown field", {"prompt": PROMPT, "temprature": 0}, 400, "temprature"),
    ("logprobs with stream", {"prompt": PROMPT, "logprobs": 1, "stream": True}, 400, "logprobs"),
    ("bad recipe override", {"prompt": PROMPT, "logitfusion": {"recipe": {"max_alpha": -1}}}, 400,
     "logitfusion.recipe"),
    ("huge body", {"prompt": "x" * 70000}, 413, "request"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_field(service, what, body, status, param):
    url = f"{service.base_url}/v1/completions"
    if isinstance(body, bytes):
        resp = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        resp = requests.post(url, json=body, timeout=60)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] is not None and err["param"].startswith(param), err
    assert err["message"].startswith(err["param"]) and err["code"] == status


def test_the_service_stays_healthy_after_bad_input(service, oai, workers):
    assert requests.get(f"{service.base_url}/health", timeout=30).status_code == 200
    assert oai.completions.create(model="dlf_capital", prompt=PROMPT, max_tokens=4).choices[0].text
    assert_idle(workers)
    resp = requests.get(f"{service.base_url}/v1/nowhere", timeout=30)
    assert resp.status_code == 404 and "error" in resp.json()


# ------------------------------------------------------------------------------------------------ models, tokenizer


def test_models_and_the_remote_tokenizer_lm_eval_reads(service, zoo_runners):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    ids = sorted(m["id"] for m in requests.get(f"{service.base_url}/v1/models", timeout=30).json()["data"])
    assert ids == sorted(PRESETS)
    url = f"{service.base_url}/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote = RemoteTokenizer(url)
    tok = zoo_runners["large"].tokenizer
    assert remote.encode(PROMPT) == tok.encode(PROMPT, add_special_tokens=False)
    assert remote.decode(tok.encode(PROMPT)) == tok.decode(tok.encode(PROMPT))
    assert remote.eos_token == tok.eos_token and remote.bos_token_id == tok.bos_token_id


# ------------------------------------------------------------------------------------------------ /metrics


def test_metrics_in_the_prometheus_format(service, oai):
    from prometheus_client.parser import text_string_to_metric_families

    oai.completions.create(model="dlf_capital", prompt=PROMPT, max_tokens=4)
    requests.post(f"{service.base_url}/v1/completions", json={"prompt": PROMPT, "n": 2}, timeout=30)
    resp = requests.get(f"{service.base_url}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)

    def value(name, **labels):
        return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("logitfusion_requests_total", preset="dlf_capital", status="ok", api="http") >= 1
    assert value("logitfusion_requests_total", status="invalid_argument", api="http") >= 1
    assert value("logitfusion_generated_tokens_total", preset="dlf_capital") >= 4
    assert value("logitfusion_time_to_first_token_seconds_count", preset="dlf_capital") >= 1
    assert value("logitfusion_step_seconds_count") >= 4 and value("logitfusion_fusion_solve_seconds_count") >= 4
    assert value("logitfusion_expert_weight_count", expert="expert_capital") >= 4
    assert "logitfusion_queue_depth" in samples and "logitfusion_requests_in_flight" in samples
    live = {s.labels["model"] for s in samples["logitfusion_live_sequences"]}
    assert live == {"large", "small", "expert_capital"}


# ------------------------------------------------------------------------------------------------ the harness


def run_harness(service, preset: str, out: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    from logitfusion.models.zoo.build import load_zoo

    args = [
        sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
        "--model_args", f"model={preset},base_url={service.base_url}/v1/completions,tokenizer_backend=huggingface,"
                        f"tokenizer={load_zoo().model('large')},add_bos_token=True",
        "--tasks", "zoo_capital_gen", "zoo_capital_mc", "--include_path", str(HARNESS),
        "--limit", str(HARNESS_LIMIT), "--output_path", str(out / "results"), "--log_samples",
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=480, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next((out / "results").rglob("results_*.json")).read_text())["results"]
    samples = {
        task: [json.loads(line) for line in next((out / "results").rglob(f"samples_{task}_*.jsonl")).open()]
        for task in ("zoo_capital_gen", "zoo_capital_mc")
    }
    return {"results": results, "samples": samples}


def test_lm_eval_harness_matches_logitfusion_eval_and_the_fused_logprobs(service, zoo_runners, workers, tmp_path):
    from logitfusion.eval.run import evaluate_zoo

    got = run_harness(service, "proxy_capital", tmp_path)
    # generate_until: the harness's accuracy (and every answer) is what `logitfusion eval` reports for the same
    # recipe (its "static" method = preset proxy_capital) on the same items
    rows, items = evaluate_zoo(tasks=["capital"], limit=HARNESS_LIMIT, keep_items=True, progress=False)
    ref_acc = next(r for r in rows if r.method == "static").accuracy
    ref_out = {it.prompt: it.output for it in items if it.method == "static"}
    gen = got["samples"]["zoo_capital_gen"]
    assert len(gen) == HARNESS_LIMIT
    assert {s["doc"]["prompt"]: s["resps"][0][0] for s in gen} == ref_out
    assert got["results"]["zoo_capital_gen"]["exact_match,none"] == pytest.approx(ref_acc)
    # multiple choice: every choice's loglikelihood recomputed from fused log-probs in-process, then the accuracy
    tok = zoo_runners["large"].tokenizer
    correct = []
    for s in got["samples"]["zoo_capital_mc"]:
        doc = s["doc"]
        lls = []
        for choice, resp in zip(doc["choices"], s["resps"]):
            ctx = tok(doc["prompt"])["input_ids"]
            ids = tok(doc["prompt"] + " " + choice)["input_ids"]
            lp = fused_logprobs(zoo_runners, ids, "proxy_capital")
            ll = sum(float(lp[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))
            assert float(resp[0][0]) == pytest.approx(ll, abs=2e-3)
            lls.append(ll)
        correct.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
    assert got["results"]["zoo_capital_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert_idle(workers)
