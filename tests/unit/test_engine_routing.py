"""Routed fusion in the Decoder on the zoo's trained checkpoints: each request is routed on its own prompt (the
small base's representation comes back with its prefill), a mixed batch equals each request alone, greedy output
equals a plain full-recompute loop fed with independently computed weights, a far prompt decodes with the large
base alone, speculative decoding is unchanged. Skipped until the zoo is built."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig, StepFailed
from logitfusion.engine.local import LocalRunner
from logitfusion.engine.reference import naive_decode
from logitfusion.engine.runner import ExtendOp, ModelRunner, RunnerInfo, StepPlan
from logitfusion.fusion import presets
from logitfusion.fusion.routing import build_table, route

pytestmark = pytest.mark.timeout(300)

TASKS = ("capital", "colour", "year", "add")
EXPERTS = tuple(f"expert_{t}" for t in TASKS)
MODELS = ("large", "small", *EXPERTS)
FAR = "the old songs of the valley speak of rain and bread"  # filler prose, no question of any task


@pytest.fixture(scope="module")
def zoo(zoo_runners):
    return zoo_runners  # (paths, name -> LocalRunner of MODELS)


@pytest.fixture(scope="module")
def examples(zoo):
    from logitfusion.eval.run import zoo_route_examples

    return zoo_route_examples(zoo[0].model("small"), TASKS)


@pytest.fixture(scope="module")
def items(zoo):
    from logitfusion.models.zoo import tasks as zt

    tok = zoo[1]["large"].tokenizer
    out = [(t, it.prompt, it.reference) for t in (*TASKS, "animal") for it in zt.eval_items(t, limit=1)]
    return [(t, tok.encode(p), ref) for t, p, ref in out]


def _decoder(runners, **kw) -> Decoder:
    tok = runners["large"].tokenizer
    return Decoder(runners, eos_token_ids=[tok.eos_token_id],
                   decode_fn=lambda ids: tok.decode(list(ids), skip_special_tokens=True), **kw)


def _req(rid: str, ids, recipe, n: int = 10, **kw) -> GenerationRequest:
    return GenerationRequest(rid, ids, recipe, max_new_tokens=n, **kw)


def test_each_row_of_a_mixed_batch_is_routed_on_its_own_prompt_and_equals_it_alone(zoo, examples, items) -> None:
    _, runners = zoo
    recipe = presets.routed("large", "small", EXPERTS, examples)
    batch = _decoder(runners).generate([_req(f"{t}", ids, recipe) for t, ids, _ in items])
    for (task, ids, ref), got in zip(items, batch):
        alone = _decoder(runners).generate([_req("solo", ids, recipe)])[0]
        assert got.token_ids == alone.token_ids and got.route == alone.route
        torch.testing.assert_close(torch.tensor(got.weights), torch.tensor(alone.weights), atol=5e-3, rtol=0)  # solved: flat loss
        want = [1.0 if e == f"expert_{task}" else 0.0 for e in EXPERTS]  # animal: no expert at all ("none")
        assert list(got.route) == want, task
        assert all(w[i] == 0.0 for w in got.weights for i, x in enumerate(want) if x == 0.0)
        if task in ("capital", "colour", "year"):
            assert got.text == ref  # the routed expert's format, the large base's fact
    assert all(not r.sequences() for r in runners.values())  # the example table's sequences were released too


def test_greedy_equals_a_plain_loop_fed_with_independently_computed_weights(zoo, examples, items) -> None:
    _, runners = zoo
    models = {n: r._model for n, r in runners.items()}
    small = models["small"]

    def rep(ids) -> torch.Tensor:  # the representation, straight from the model: mean last hidden state
        with torch.inference_mode():
            return small(input_ids=torch.tensor([list(ids)]), output_hidden_states=True).hidden_states[-1][0].mean(0)

    table = build_table([torch.stack([rep(p) for p in ex]) for ex in examples], centre=True)
    for recipe in (presets.routed("large", "small", EXPERTS, examples, top_k=0, tau=0.02),
                   presets.routed("large", "small", EXPERTS, examples, inner="static")):
        for _, ids, _ in items[1:3]:
            weights, _ = route(rep(ids).unsqueeze(0), table, recipe.route)
            ref = naive_decode(models, ids, recipe, vocab_size=runners["large"].describe().vocab_size,
                               max_new_tokens=8, route_weights=weights)
            got = _decoder(runners).generate([_req("r", ids, recipe, n=8, stop_token_ids=())])[0]
            assert got.token_ids == ref.token_ids
            torch.testing.assert_close(torch.tensor(got.route), weights[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(got.weights), torch.tensor(ref.weights), atol=5e-3, rtol=0)


def test_a_far_prompt_is_routed_to_none_and_decodes_as_the_large_base_alone(zoo, examples) -> None:
    _, runners = zoo
    ids = runners["large"].tokenizer.encode(FAR)
    routed = _decoder(runners).generate([_req("far", ids, presets.routed("large", "small", EXPERTS, examples))])[0]
    alone = _decoder(runners).generate([_req("far", ids, presets.single("large"))])[0]
    assert routed.route == (0.0,) * 4 and all(w == [0.0] * 4 for w in routed.weights)
    assert routed.token_ids == alone.token_ids


def test_permuting_the_experts_permutes_the_weights_and_keeps_the_tokens(zoo, examples, items) -> None:
    _, runners = zoo
    perm = [3, 1, 0, 2]
    a = presets.routed("large", "small", EXPERTS, examples, top_k=0, tau=0.05)
    b = presets.routed("large", "small", [EXPERTS[i] for i in perm], [examples[i] for i in perm], top_k=0, tau=0.05)
    for _, ids, _ in items[:4]:
        ra = _decoder(runners).generate([_req("a", ids, a, n=6)])[0]
        rb = _decoder(runners).generate([_req("b", ids, b, n=6)])[0]
        torch.testing.assert_close(torch.tensor(rb.route), torch.tensor(ra.route)[perm], atol=1e-6, rtol=0)
        assert ra.token_ids == rb.token_ids


@pytest.mark.parametrize("draft", ["expert_colour", "small"])  # "small" is also the routing model: it prefills first
def test_speculative_routed_decoding_is_token_identical(zoo, examples, items, draft) -> None:
    _, runners = zoo
    recipe = presets.routed("large", "small", EXPERTS, examples)
    for _, ids, _ in items[:3]:
        plain = _decoder(runners).generate([_req("p", ids, recipe)])[0]
        spec = _decoder(runners).generate([_req("s", ids, recipe, speculative=SpeculativeConfig(draft, 3))])[0]
        assert spec.token_ids == plain.token_ids and spec.route == plain.route
        assert spec.num_drafted_tokens > 0


class _NoFeatures(ModelRunner):
    """A runner that answers the logits of a plan but never the feature vectors (an older worker)."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner

    def describe(self) -> RunnerInfo:
        return self.inner.describe()

    def submit(self, plan: StepPlan) -> Future:
        out = self.inner.step(plan)[: len(plan.extends)]
        fut: Future = Future()
        fut.set_result(out)
        return fut

    def sequences(self) -> dict[str, int]:
        return self.inner.sequences()


def test_a_runner_without_features_fails_the_step_with_a_clear_error(zoo, examples, items) -> None:
    _, runners = zoo
    broken = {**runners, "small": _NoFeatures(runners["small"])}
    dec = _decoder(broken)
    dec.add_request(_req("x", items[0][1], presets.routed("large", "small", EXPERTS, examples)))
    with pytest.raises(StepFailed, match="cannot serve routed recipes") as info:
        dec.step()
    assert info.value.model == "small"
    dec.abort("x")
    assert not runners["small"].sequences()


@pytest.mark.parametrize("backend", ["hf", "lean"])
def test_local_runner_features_are_the_mean_of_the_prompt_positions(zoo, backend) -> None:
    paths, _ = zoo
    small = LocalRunner.from_pretrained(paths.model("small"), "small", backend=backend, threaded=False)
    assert small.backend == backend
    ids = (1, 401, 8, 552, 266, 7)
    out = small.step(StepPlan(extends=(ExtendOp("f", ids, "all", features_tokens=4), ExtendOp("g", ids[:2]))))
    assert len(out) == 3 and out[0].shape[0] == len(ids) and out[2].shape == (small._model.config.hidden_size,)
    with torch.inference_mode():
        hidden = small._model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(out[2], hidden[:4].mean(0), atol=1e-5, rtol=0)
    small.step(StepPlan(releases=("f", "g")))
    small.close()


def test_an_example_longer_than_the_routing_model_is_refused_at_add_request(zoo, examples, items) -> None:
    _, runners = zoo
    limit = runners["small"].describe().max_length_tokens
    long = [list(examples[0]) + [(1,) * (limit + 1)], *examples[1:]]
    recipe = presets.routed("large", "small", EXPERTS, long)
    with pytest.raises(ValueError, match=rf"route.examples: an example prompt of {limit + 1} tokens exceeds 'small'"):
        _decoder(runners).add_request(_req("x", items[0][1], recipe))


def test_scoring_a_sequence_under_a_routed_recipe_routes_it_on_the_sequence(zoo, examples, items) -> None:
    from logitfusion.actors.coordinator import Coordinator, TextCodec
    from logitfusion.limits import Limits

    paths, _ = zoo
    runners = {n: LocalRunner.from_pretrained(paths.model(n), n) for n in MODELS}
    tok = runners["large"].tokenizer
    coord = Coordinator(runners, codec=TextCodec.from_tokenizer(tok), limits=Limits())
    try:
        _, ids, ref = items[1]  # the colour question
        seq = list(ids) + tok.encode(" " + ref, add_special_tokens=False)
        routed = coord.score(seq, presets.routed("large", "small", EXPERTS, examples)).result(timeout=60)
        alone = coord.score(seq, presets.dlf("large", "small", ["expert_colour"])).result(timeout=60)
    finally:
        coord.close()
    assert all(a[0] == a[2] == a[3] == 0.0 for a in routed.alphas)  # only the colour expert, at every position
    torch.testing.assert_close(torch.tensor([a[1] for a in routed.alphas]), torch.tensor([a[0] for a in alone.alphas]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(routed.token_logprobs), torch.tensor(alone.token_logprobs), atol=1e-4,
                               rtol=0)
