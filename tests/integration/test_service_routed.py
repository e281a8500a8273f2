"""The zoo service as a user meets it (configs/zoo.yaml: real Ray, Serve's gRPC ingress, one gRPC worker per model):
with no recipe named, the default preset routes each question to its expert and answers it right. Skipped until the
zoo is built."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from logitfusion import errors
from logitfusion.client import FusionClient

import service_models  # tests/integration/service_models.py

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "zoo.yaml"
EXPERTS = ["expert_capital", "expert_colour", "expert_year", "expert_add"]


@pytest.fixture(scope="module")
def service():
    from logitfusion.models.zoo.build import ZooNotBuilt, load_zoo

    try:
        load_zoo()
    except ZooNotBuilt as exc:
        pytest.skip(f"zoo not built: {exc}")
    with service_models.serving(CONFIG) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    with FusionClient(service.address, timeout_s=120.0) as c:
        yield c


@pytest.fixture(scope="module")
def questions():
    from logitfusion.models.zoo import tasks as zt

    return {t: zt.eval_items(t, limit=1)[0] for t in ("capital", "colour", "year", "animal")}


def test_the_default_preset_answers_the_colour_question_with_the_colour_expert(client, questions):
    q = questions["colour"]
    done = client.generate(q.prompt, max_new_tokens=16, stop=["\n"])
    assert done.recipe == "routed_multi"
    assert done.text == q.reference  # e.g. "the flag is green", not "the capital city is ..."
    assert any(w["expert_colour"] > 0 for w in done.weights)
    assert all(w[e] == 0.0 for w in done.weights for e in EXPERTS if e != "expert_colour")
    recipes = {r.name: r for r in client.list_recipes()}
    assert recipes["routed_multi"].is_default and recipes["routed_multi"].method == "routed"
    assert "routed on the prompt" in recipes["routed_multi"].description


def test_each_question_goes_to_its_expert_and_the_unseen_one_to_the_large_base(client, questions):
    for task in ("capital", "year"):
        done = client.generate(questions[task].prompt, max_new_tokens=16, stop=["\n"])
        assert done.text == questions[task].reference
        assert {e for w in done.weights for e, x in w.items() if x > 0} == {f"expert_{task}"}
    animal = questions["animal"].prompt
    routed = client.generate(animal, max_new_tokens=12, stop=["\n"])
    alone = client.generate(animal, max_new_tokens=12, stop=["\n"], preset="large_base")
    assert routed.token_ids == alone.token_ids and all(x == 0.0 for w in routed.weights for x in w.values())


def test_overrides_speculative_decoding_and_bad_overrides(client, questions):
    q = questions["colour"]
    plain = client.generate(q.prompt, max_new_tokens=16, stop=["\n"])
    soft = client.generate(q.prompt, max_new_tokens=16, stop=["\n"], route_tau=0.1, route_top_k=0)
    static = client.generate(q.prompt, max_new_tokens=16, stop=["\n"], route_inner="static")
    spec = client.generate(q.prompt, max_new_tokens=16, stop=["\n"], draft_model="expert_colour", num_draft_tokens=3)
    assert soft.recipe == static.recipe == "custom" and soft.text == static.text == q.reference
    assert static.weights[0]["expert_colour"] == pytest.approx(1.0)  # alpha 1 times routing weight ~1
    assert spec.token_ids == plain.token_ids and spec.drafted_tokens > 0
    with pytest.raises(errors.InvalidRequest, match="top_k: 9 exceeds the 4 experts"):
        client.generate(q.prompt, max_new_tokens=4, route_top_k=9)
    with pytest.raises(errors.InvalidRequest, match=r"recipe\.tau"):
        client.generate(q.prompt, max_new_tokens=4, route_tau=0.0)


def test_concurrent_requests_of_different_tasks_are_each_routed_on_their_own_prompt(client, questions):
    out: dict[str, str] = {}

    def ask(task: str) -> None:
        out[task] = client.generate(questions[task].prompt, max_new_tokens=16, stop=["\n"]).text

    threads = [threading.Thread(target=ask, args=(t,)) for t in ("capital", "colour", "year")]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert time.monotonic() - t0 < 120
    assert out == {t: questions[t].reference for t in ("capital", "colour", "year")}
