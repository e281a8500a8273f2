"""The HTTP ingress's pure parts: field checks (messages name the OpenAI field), the error -> HTTP status mapping,
the sequence scoring math, the metrics registry, and the harness data file being current."""

from __future__ import annotations

import math

import pytest
import torch

from logitfusion import errors
from logitfusion.cluster.http_app import _http_field, build_pb, parse_sampling
from logitfusion.cluster.topology import parse_topology
from logitfusion.engine.scoring import score_tokens

TOPO = parse_topology({
    "models": [{"name": "large", "role": "large", "path": "/m/large"}, {"name": "small", "role": "small",
                                                                          "path": "/m/small"},
               {"name": "expert_a", "role": "expert", "path": "/m/a"}],
    "presets": {"dlf_a": {"method": "dlf", "experts": ["expert_a"]}, "large_base": {"method": "single",
                                                                                    "model": "large"}},
    "default_preset": "dlf_a",
    "limits": {"max_new_tokens": 32, "default_max_new_tokens": 8, "max_concurrent_requests": 4, "max_batch_size": 4},
})


@pytest.mark.parametrize("exc,status", [
    (errors.InvalidRequest("x: bad", field="x"), 400),
    (ValueError("x: bad"), 400),
    (errors.MessageTooLarge("request: big"), 413),
    (errors.Overloaded("busy"), 429),
    (errors.DeadlineExceeded("late"), 504),
    (errors.ModelUnavailable("gone"), 503),
    (errors.Unauthenticated("who"), 401),
    (errors.NotFound("where"), 404),
    (RuntimeError("boom"), 500),
])
def test_every_error_class_has_one_http_status(exc, status):
    got, kind, err = errors.to_http(exc)
    assert got == status and kind
    code, details = errors.to_status(exc)
    assert err.code == code and err.message == details  # the same message as the gRPC status


@pytest.mark.parametrize("body,field,match", [
    ({"model": "gpt-4"}, "model", "unknown model 'gpt-4'"),
    ({"model": 3}, "model", "expected a string, got number"),
    ({"n": 2}, "n", "only n = 1"),
    ({"n": "1"}, "n", "expected an integer, got string"),
    ({"best_of": 3}, "best_of", "best_of = 1"),
    ({"max_tokens": 0}, "max_tokens", r"\[1, 32\].*0 only with echo"),
    ({"max_tokens": 33}, "max_tokens", "max_new_tokens"),
    ({"max_tokens": True}, "max_tokens", "expected an integer, got boolean"),
    ({"temperature": -1}, "temperature", r"\[0.0, 100.0\]"),
    ({"temperature": float("nan")}, "temperature", "finite"),
    ({"top_p": 0}, "top_p", r"\(0.0, 1.0\]"),
    ({"seed": -1}, "seed", "2\\^63"),
    ({"stop": 5}, "stop", "string or an array of strings"),
    ({"stream": "yes"}, "stream", "boolean"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"logitfusion": {"recipes": {}}}, "logitfusion.recipes", "unknown field"),
])
def test_sampling_fields_are_checked_by_name(body, field, match):
    with pytest.raises(errors.InvalidRequest, match=match) as info:
        parse_sampling(body, TOPO)
    assert info.value.field == field and info.value.message.startswith(field)


def test_defaults_and_echo_allow_zero_tokens():
    s = parse_sampling({}, TOPO)
    assert (s.preset, s.max_tokens, s.stop, s.stream) == ("dlf_a", 8, [], False)
    assert parse_sampling({"max_tokens": 0}, TOPO, allow_zero_tokens=True).max_tokens == 0
    assert parse_sampling({"stop": "\n", "n": 1, "best_of": 1}, TOPO).stop == ["\n"]


def test_the_grpc_checks_name_http_fields():
    from logitfusion.actors.coordinator import TextCodec
    from logitfusion.cluster.convert import request_from_pb

    codec = TextCodec(encode=lambda t: [1] * len(t), decode=lambda ids: "", eos_token_ids=())

    def convert(body):
        msg = build_pb(parse_sampling(body, TOPO), [1, 2, 3], "r")
        try:
            return request_from_pb(msg, topology=TOPO, codec=codec, vocab_size=10, request_id="r")
        except errors.FusionError as exc:
            raise _http_field(exc) from None

    req = convert({"model": "large_base", "temperature": 0.5, "seed": 7, "stop": ["x"]})
    assert req.recipe.name == "large_base" and req.sampling.seed == 7 and req.stop_strings == ("x",)
    custom = convert({"logitfusion": {"recipe": {"solver": "grid", "max_alpha": 1.5}}})
    assert custom.recipe.name == "custom" and custom.recipe.solver == "grid"
    with pytest.raises(errors.InvalidRequest) as info:
        convert({"stop": [str(i) for i in range(9)]})
    assert info.value.field == "stop" and "max_stop_strings" in info.value.message
    with pytest.raises(errors.InvalidRequest) as info:
        convert({"logitfusion": {"recipe": {"max_alpha": 99}}})
    assert info.value.field.startswith("logitfusion.recipe")
    with pytest.raises(errors.InvalidRequest) as info:
        convert({"logitfusion": {"recipe": {"experts": "expert_a"}}})
    assert info.value.field == "logitfusion.recipe.experts"
    with pytest.raises(errors.InvalidRequest) as info:
        convert({"logitfusion": {"speculative": {"draft_model": "nope"}}})
    assert info.value.field == "logitfusion.speculative.draft_model"
    for name, value in (("tau", 0.2), ("inner", "static"), ("top_k", 1), ("min_similarity", 0.1)):
        with pytest.raises(errors.InvalidRequest) as info:  # the routed fields reach the table's check by name
            convert({"logitfusion": {"recipe": {name: value}}})
        assert f"{name}: only method routed takes it, not 'dlf'" in info.value.message
        assert info.value.field.startswith("logitfusion.recipe")
    static = convert({"logitfusion": {"recipe": {"solver": "static"}}})  # solving off: fixed alphas, same experts
    assert static.recipe.method == "static" and static.recipe.alphas == (1.0,) and static.recipe.validated


def test_score_tokens_reads_the_next_token_of_every_row():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(4, 6), dim=-1)  # rows after t0, t1, t2, t3
    ids = [2, 5, 0, 3]
    s = score_tokens(lp, ids, top_n=2, alphas=torch.tensor([[0.1], [0.2], [0.3], [0.4]]))
    assert s.token_logprobs == pytest.approx([float(lp[0, 5]), float(lp[1, 0]), float(lp[2, 3])])
    assert len(s.top) == 4 and [t for t, _ in s.top[3]] == lp[3].topk(2).indices.tolist()
    assert s.top[0][0][1] >= s.top[0][1][1] and s.alphas[2] == pytest.approx((0.3,))
    one = score_tokens(lp[:1], [2], top_n=0)
    assert one.token_logprobs == () and one.top == ((),)
    with pytest.raises(ValueError, match=r"expected \[3, V\]"):
        score_tokens(lp, [1, 2, 3], top_n=1)


def test_metrics_render_in_the_prometheus_format():
    from prometheus_client.parser import text_string_to_metric_families

    from logitfusion.metrics import ServiceMetrics

    m = ServiceMetrics("r1", presets=["dlf_a"])
    m.request_done("dlf_a", "ok", "http")
    m.request_done("made-up", "invalid_argument", "http")  # an unknown name never becomes a label
    m.on_first_token("dlf_a", 0.02)
    m.on_token("dlf_a", ["expert_a"], [0.7])
    m.on_step(0.01, 0.001)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    reqs = {(s.labels["preset"], s.labels["status"]): s.value for s in fams["logitfusion_requests"].samples
            if s.name.endswith("_total")}
    assert reqs == {("dlf_a", "ok"): 1.0, ("unknown", "invalid_argument"): 1.0}
    weight = [s for s in fams["logitfusion_expert_weight"].samples if s.name.endswith("_sum")]
    assert weight[0].labels["expert"] == "expert_a" and math.isclose(weight[0].value, 0.7)
    assert any(s.value == 1 for s in fams["logitfusion_fusion_solve_seconds"].samples if s.name.endswith("_count"))


def test_the_harness_data_file_is_current():
    from logitfusion.eval.harness import build

    rows = build.capital_rows()
    assert build.DATA.read_text() == build.render(rows)
    assert all(r["choices"][r["label"]] == r["reference"] and len(set(r["choices"])) == 4 for r in rows)
