"""The Decoder on tiny random Llama models: cached, batched fused decoding equals the full-recompute reference."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace

import pytest
import torch

from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig, StepFailed
from logitfusion.engine.local import LocalRunner
from logitfusion.engine.reference import naive_decode, sequential_decode
from logitfusion.engine.runner import ModelRunner, RunnerInfo, RunnerUnavailable, StepPlan, failed
from logitfusion.engine.testing import (
    TINY_FAMILY,
    TINY_FINGERPRINT,
    TINY_VOCAB_SIZE,
    StallingRunner,
    tiny_decode,
)
from logitfusion.fusion import SamplingParams, presets

V = TINY_VOCAB_SIZE
PROMPTS = [[5, 17, 3], [40, 41, 42, 43, 44, 45, 46, 47], [9], [60, 2, 71, 33, 12]]

pytestmark = pytest.mark.timeout(240)


def make_decoder(runners, **kw) -> Decoder:
    kw.setdefault("decode_fn", tiny_decode)
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_new_tokens_limit", 64)
    return Decoder(runners, **kw)


def assert_no_leaks(runners) -> None:
    for name, r in runners.items():
        assert r.sequences() == {}, name


RECIPES = {
    "single_large": presets.single("large"),
    "single_expert": presets.single("expert_a"),
    "proxy": presets.proxy_tuning("large", "small", "expert_a"),
    "static2": presets.static("large", "small", ["expert_a", "expert_b"], alphas=[0.7, 1.2]),
    "eft_up": presets.eft_up("large", "small", "expert_a", beta=1.5),
    "eft_down": presets.eft_down("small", "large", "large_ft"),
    "lambda": presets.lambda_interp("large", "small", "expert_a", "expert_b", 0.3),
    "dlf_grid": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="grid"),
    "dlf_newton": presets.dlf("large", "small", ["expert_a"], solver="newton"),
    "dlf_joint": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="joint"),
}


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_greedy_fused_decode_matches_full_recompute(models, runners, kind) -> None:
    recipe = RECIPES[kind]
    dec = make_decoder(runners)
    reqs = [GenerationRequest(f"r{i}", p, recipe, max_new_tokens=10, stop_token_ids=()) for i, p in enumerate(PROMPTS)]
    results = dec.generate(reqs)
    for req, res in zip(reqs, results):
        ref = naive_decode(models, req.prompt_ids, recipe, vocab_size=V, max_new_tokens=10)
        assert res.token_ids == ref.token_ids, (kind, req.request_id)
        assert res.finish_reason == "length" and res.num_steps == 10
        assert res.experts == recipe.experts
        assert len(res.weights) == 10 and all(len(w) == len(recipe.experts) for w in res.weights)
        # joint: a flat objective, so ~1e-7 of batching noise may move alpha by a few hundredths at equal loss
        atol = 0.1 if kind == "dlf_joint" else 1e-3
        assert torch.allclose(torch.tensor(res.weights), torch.tensor(ref.weights).reshape(10, -1), atol=atol)
        assert res.text == tiny_decode(res.token_ids)
    assert_no_leaks(runners)


def test_sequential_reference_matches_naive(models) -> None:
    recipe = RECIPES["dlf_newton"]
    a = naive_decode(models, PROMPTS[1], recipe, vocab_size=V, max_new_tokens=8)
    b = sequential_decode(models, PROMPTS[1], recipe, vocab_size=V, max_new_tokens=8)
    assert a.token_ids == b.token_ids


def test_sampled_decode_is_seeded_per_request_and_independent_of_the_batch(models, runners) -> None:
    recipe = RECIPES["dlf_newton"]
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    req = GenerationRequest("s", PROMPTS[3], recipe, sampling=sp, max_new_tokens=12, stop_token_ids=())
    others = [GenerationRequest(f"o{i}", p, recipe, sampling=SamplingParams(temperature=1.0, seed=i),
                                max_new_tokens=12, stop_token_ids=()) for i, p in enumerate(PROMPTS[:3])]
    dec = make_decoder(runners)
    alone = dec.generate([req])[0]
    batched = dec.generate(others + [req])[-1]
    ref = naive_decode(models, req.prompt_ids, recipe, vocab_size=V, sampling=sp, max_new_tokens=12)
    assert alone.token_ids == batched.token_ids == ref.token_ids
    assert_no_leaks(runners)


def test_continuous_batching_joins_mid_way_identical_to_solo(models, runners) -> None:
    recipe = RECIPES["proxy"]
    dec = make_decoder(runners, max_batch_size=2)
    reqs = [GenerationRequest(f"r{i}", p, recipe, max_new_tokens=6 + 2 * i, stop_token_ids=())
            for i, p in enumerate(PROMPTS)]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    finished: set[str] = set()
    dec.add_request(reqs[0])
    steps = 0
    while len(finished) < len(reqs):
        if steps == 2:
            dec.add_request(reqs[1])
        if steps == 3:
            dec.add_request(reqs[2])  # waits: max_batch_size=2
            dec.add_request(reqs[3])
        for ev in dec.step():
            tokens[ev.request_id].append(ev.token_id)
            if ev.finished:
                finished.add(ev.request_id)
        assert len(dec._live) <= 2
        steps += 1
    assert not dec.has_work()
    for r in reqs:
        ref = naive_decode(models, r.prompt_ids, recipe, vocab_size=V, max_new_tokens=r.max_new_tokens)
        assert tokens[r.request_id] == ref.token_ids, r.request_id
    assert_no_leaks(runners)


def test_per_model_prompts(models, runners) -> None:
    recipe = RECIPES["proxy"]
    mp = {"large": [1, 2, 3, 4, 5, 6] + PROMPTS[0], "expert_a": [7, 7] + PROMPTS[0]}
    req = GenerationRequest("m", PROMPTS[0], recipe, max_new_tokens=8, stop_token_ids=(), model_prompts=mp)
    res = make_decoder(runners).generate([req])[0]
    ref = naive_decode(models, PROMPTS[0], recipe, vocab_size=V, max_new_tokens=8, model_prompts=mp)
    plain = naive_decode(models, PROMPTS[0], recipe, vocab_size=V, max_new_tokens=8)
    assert res.token_ids == ref.token_ids
    assert ref.token_ids != plain.token_ids  # the overrides really changed what the models saw


def test_only_the_recipes_models_are_touched(runners) -> None:
    dec = make_decoder(runners)
    dec.add_request(GenerationRequest("a", PROMPTS[0], RECIPES["single_large"], max_new_tokens=5))
    dec.step()
    assert set(runners["large"].sequences()) == {"a"}
    for name in ("small", "expert_a", "expert_b", "large_ft"):
        assert runners[name].sequences() == {} and runners[name].stats["forwards"] == 0, name
    dec.abort("a")
    assert_no_leaks(runners)


def test_stop_tokens_and_stop_strings(models, runners) -> None:
    recipe = RECIPES["proxy"]
    ref = naive_decode(models, PROMPTS[1], recipe, vocab_size=V, max_new_tokens=12).token_ids
    # EOS: the decoder's default stop tokens; the stop token is returned, its text is not
    eos = ref[4]
    first = ref.index(eos)
    dec = make_decoder(runners, eos_token_ids=[eos])
    res = dec.generate([GenerationRequest("e", PROMPTS[1], recipe, max_new_tokens=12)])[0]
    assert res.token_ids == ref[: first + 1] and res.finish_reason == "stop" and res.stop == ""  # a stop token
    assert res.text == tiny_decode(ref[:first])
    # explicit stop_token_ids override the default; () disables it
    res = dec.generate([GenerationRequest("e2", PROMPTS[1], recipe, max_new_tokens=12, stop_token_ids=())])[0]
    assert res.token_ids == ref and res.finish_reason == "length"
    # a stop string spanning two tokens: generation stops at the token completing it, the text ends before it
    text = tiny_decode(ref)
    stop = text[6:8]
    cut = text.index(stop)
    evs: list = []
    (res,) = dec.run([GenerationRequest("s", PROMPTS[1], recipe, max_new_tokens=12, stop_token_ids=(),
                                        stop_strings=("zzzz-never", stop))], on_step=evs.extend)
    assert res.finish_reason == "stop" and res.stop == stop and evs[-1].result == res
    assert res.token_ids == ref[: cut + 2]
    assert res.text == text[:cut]
    # the first character of the stop string was held back, never streamed
    assert "".join(e.text_delta for e in evs) == text[:cut]
    assert_no_leaks(runners)


def test_held_back_text() -> None:
    from logitfusion.engine.decoder import _held_back

    assert _held_back("hello wor", ("world",)) == "hello "
    assert _held_back("hello w", ("xy", "wz")) == "hello "
    assert _held_back("hello", ("xy",)) == "hello"
    assert _held_back("caf\ufffd", ()) == "caf"


def test_streamed_text_deltas_add_up(runners) -> None:
    dec = make_decoder(runners)
    dec.add_request(GenerationRequest("t", PROMPTS[2], RECIPES["lambda"], max_new_tokens=7, stop_token_ids=()))
    evs = []
    while dec.has_work():
        evs += dec.step()
    assert [e.step for e in evs] == list(range(1, 8))
    assert "".join(e.text_delta for e in evs) == tiny_decode([e.token_id for e in evs])
    assert [e.finished for e in evs] == [False] * 6 + [True] and evs[-1].finish_reason == "length"
    assert all(len(e.alphas) == 2 for e in evs)


def test_abort_releases_every_cache(runners) -> None:
    dec = make_decoder(runners)
    recipe = RECIPES["dlf_grid"]
    for i in range(3):
        dec.add_request(GenerationRequest(f"r{i}", PROMPTS[i], recipe, max_new_tokens=20, stop_token_ids=()))
    dec.step()
    dec.step()
    assert set(runners["large"].sequences()) == {"r0", "r1", "r2"}
    assert "large_ft" not in {n for n, r in runners.items() if r.sequences()}
    # idle (no step running): the caches are freed at once; the abort event comes with the next step
    assert dec.abort("r1") is True
    for name in ("large", "small", "expert_a", "expert_b"):
        assert set(runners[name].sequences()) == {"r0", "r2"}, name
    evs = dec.step()
    ab = [e for e in evs if e.request_id == "r1"]
    assert len(ab) == 1 and ab[0].finished and ab[0].finish_reason == "abort" and ab[0].token_id is None
    assert {e.request_id for e in evs if e.token_id is not None} == {"r0", "r2"}
    # an abort of a waiting request, and of an unknown or finished one
    dec.add_request(GenerationRequest("w", PROMPTS[3], recipe, max_new_tokens=5))
    assert dec.abort("w") is True and dec.abort("nope") is False and dec.abort("r1") is False
    dec.abort("r0")
    dec.abort("r2")
    evs = dec.step()
    assert sorted(e.request_id for e in evs) == ["r0", "r2", "w"] and all(e.finish_reason == "abort" for e in evs)
    assert not dec.has_work() and dec.live_request_ids() == []
    assert_no_leaks(runners)


def test_finished_requests_free_their_caches(runners) -> None:
    dec = make_decoder(runners)
    dec.generate([GenerationRequest("a", PROMPTS[0], RECIPES["static2"], max_new_tokens=3),
                  GenerationRequest("b", PROMPTS[1], RECIPES["static2"], max_new_tokens=9)])
    assert_no_leaks(runners)
    assert not dec.has_work()


def test_bad_requests_raise_precise_errors(runners) -> None:
    dec = make_decoder(runners, max_new_tokens_limit=50)
    ok = GenerationRequest("x", [1, 2], RECIPES["proxy"], max_new_tokens=5)

    def bad(message: str, **changes) -> None:
        fields = {**ok.__dict__, **changes}
        with pytest.raises(ValueError, match=message):
            dec.add_request(GenerationRequest(**fields))

    bad(r"max_new_tokens=0 must be in 1\.\.50", max_new_tokens=0)
    bad(r"max_new_tokens=51 must be in 1\.\.50", max_new_tokens=51)
    bad("prompt_ids must not be empty", prompt_ids=[])
    bad(rf"prompt_ids has token id {V} outside 0\.\.{V - 1}", prompt_ids=[1, V])
    bad("request_id must be a non-empty string", request_id="")
    bad(r"reads unknown models \['nobody'\]", recipe=presets.proxy_tuning("large", "small", "nobody"))
    bad(r"model_prompts names \['expert_b'\]", model_prompts={"expert_b": [1]})
    bad(r"model_prompts\['large'\] must not be empty", model_prompts={"large": []})
    bad(r"stop_token_ids has 500 outside", stop_token_ids=(500,))
    bad(r"speculative.draft_model 'ghost' is unknown", speculative=SpeculativeConfig("ghost"))
    bad(r"speculative.num_draft_tokens=0", speculative=SpeculativeConfig("expert_a", num_draft_tokens=0))
    limit = TINY_FAMILY["large"].max_length_tokens
    long_prompt = [1] * (limit - 10)
    bad(rf"prompt \({limit - 10} tokens for model 'large'\) \+ max_new_tokens \(20\) exceeds 'large' "
        rf"max_length_tokens={limit}", model_prompts={"large": long_prompt}, max_new_tokens=20)
    no_text = make_decoder(runners, decode_fn=None)
    with pytest.raises(ValueError, match="stop_strings need a Decoder with a decode_fn"):
        no_text.add_request(GenerationRequest("x", [1], RECIPES["proxy"], stop_strings=("a",)))
    dec.add_request(ok)
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        dec.add_request(ok)
    assert dec.abort("x")


def test_the_recipe_is_validated_once_at_add_request_never_per_step(runners, monkeypatch) -> None:
    from logitfusion.fusion import dlf as dlf_module
    from logitfusion.fusion import recipe as recipe_module

    checks: list[str] = []
    real = recipe_module._check_coeffs
    monkeypatch.setattr(recipe_module, "_check_coeffs", lambda c: (checks.append("recipe"), real(c))[1])
    monkeypatch.setattr(dlf_module, "check_solver", lambda s: checks.append("solver"))
    raw = replace(RECIPES["dlf_joint"], name="raw")  # an unvalidated copy, as a library caller may build one
    assert not raw.validated
    dec = make_decoder(runners)
    reqs = [GenerationRequest(f"r{i}", p, raw, max_new_tokens=6, stop_token_ids=()) for i, p in enumerate(PROMPTS)]
    results = dec.generate(reqs)
    assert [r.num_steps for r in results] == [6] * len(PROMPTS)
    assert checks == ["recipe"]  # once, by the first add_request; 6 steps of 4 rows fused and solved unchecked
    bad = replace(raw, solver="bisect")
    with pytest.raises(ValueError, match="solver='bisect': must be one of grid, newton, joint"):
        dec.add_request(GenerationRequest("bad", [1, 2], bad, max_new_tokens=2))


def test_mismatched_vocabularies_are_refused_naming_the_models(models) -> None:
    good = LocalRunner(models["large"], name="large", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT)
    other = LocalRunner(models["small"], name="small", vocab_size=V, vocab_fingerprint="f" * 64)
    with pytest.raises(ValueError, match="models 'large' and 'small' have different vocabularies"):
        Decoder({"large": good, "small": other})
    smaller = LocalRunner(models["small"], name="small", vocab_size=V - 1, vocab_fingerprint=TINY_FINGERPRINT)
    with pytest.raises(ValueError, match=rf"models 'large' and 'small' report vocab_size {V} vs {V - 1}"):
        Decoder({"large": good, "small": smaller})
    for r in (good, other, smaller):
        r.close()


class Flaky(ModelRunner):
    """A runner that fails chosen submits (fault injection), else delegates."""

    def __init__(self, inner: ModelRunner, fail_at: set[int], exc: BaseException) -> None:
        self.inner, self.fail_at, self.exc, self.calls = inner, fail_at, exc, 0

    def describe(self) -> RunnerInfo:
        return self.inner.describe()

    def submit(self, plan: StepPlan) -> Future:
        self.calls += 1
        if self.calls in self.fail_at:
            if self.calls % 2:
                raise self.exc  # a submit that raises at once
            return failed(self.exc)  # a submit whose future fails
        return self.inner.submit(plan)

    def sequences(self) -> dict[str, int]:
        return self.inner.sequences()


@pytest.mark.parametrize("kind", ["proxy", "spec"])
def test_a_failed_step_can_be_retried_and_output_is_unchanged(models, runners, kind) -> None:
    recipe = RECIPES["proxy"]
    spec = SpeculativeConfig("expert_a", num_draft_tokens=3) if kind == "spec" else None
    ref = naive_decode(models, PROMPTS[1], recipe, vocab_size=V, max_new_tokens=10).token_ids
    flaky = dict(runners)
    flaky["small"] = Flaky(runners["small"], {3, 6}, RunnerUnavailable("worker lost"))
    dec = make_decoder(flaky)
    dec.add_request(GenerationRequest("f", PROMPTS[1], recipe, max_new_tokens=10, stop_token_ids=(), speculative=spec))
    tokens, failures = [], 0
    while dec.has_work():
        try:
            tokens += [e.token_id for e in dec.step()]
        except StepFailed as err:
            assert err.model == "small" and "worker lost" in str(err)
            failures += 1
    assert failures == 2 and tokens == ref
    assert_no_leaks(runners)


def test_resync_after_a_worker_lost_its_caches(models, runners) -> None:
    recipe = RECIPES["dlf_newton"]
    ref = naive_decode(models, PROMPTS[0], recipe, vocab_size=V, max_new_tokens=9).token_ids
    dec = make_decoder(runners)
    dec.add_request(GenerationRequest("r", PROMPTS[0], recipe, max_new_tokens=9, stop_token_ids=()))
    tokens = []
    for _ in range(4):
        tokens += [e.token_id for e in dec.step()]
    runners["large"].step(StepPlan(releases=("r",)))  # the "restarted worker" is empty
    dec.resync("large")
    while dec.has_work():
        tokens += [e.token_id for e in dec.step()]
    assert tokens == ref
    assert_no_leaks(runners)


class Gate(ModelRunner):
    """Blocks inside submit until released, so another thread can act while a step is running."""

    def __init__(self, inner: ModelRunner) -> None:
        import threading

        self.inner, self.entered, self.release, self.armed = inner, threading.Event(), threading.Event(), False

    def describe(self) -> RunnerInfo:
        return self.inner.describe()

    def submit(self, plan: StepPlan) -> Future:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(timeout=60)
        return self.inner.submit(plan)

    def sequences(self) -> dict[str, int]:
        return self.inner.sequences()


def test_abort_and_add_from_another_thread_during_a_step(runners) -> None:
    import threading

    gated = dict(runners)
    gate = gated["large"] = Gate(runners["large"])
    dec = make_decoder(gated)
    recipe = RECIPES["proxy"]
    dec.add_request(GenerationRequest("a", PROMPTS[0], recipe, max_new_tokens=10))
    dec.step()
    gate.armed = True
    stepper = threading.Thread(target=dec.step)
    stepper.start()
    assert gate.entered.wait(timeout=60)
    assert dec.abort("a") is True  # a step is running: queued, nothing is freed under its feet
    dec.add_request(GenerationRequest("b", PROMPTS[1], recipe, max_new_tokens=3, stop_token_ids=()))
    assert set(runners["large"].sequences()) == {"a"}
    gate.release.set()
    stepper.join(timeout=60)
    assert not stepper.is_alive()
    evs = dec.step()
    assert [(e.request_id, e.finish_reason) for e in evs if e.request_id == "a"] == [("a", "abort")]
    assert set(runners["large"].sequences()) == {"b"}
    while dec.has_work():
        dec.step()
    assert_no_leaks(runners)


def test_fusion_device_is_checked_by_name(runners) -> None:
    with pytest.raises(ValueError, match=r"fusion_device='bogus' is not a torch device"):
        Decoder(runners, fusion_device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"fusion_device='cuda': CUDA is not available"):
            Decoder(runners, fusion_device="cuda")
    assert Decoder(runners).fusion_device == torch.device("cpu")


def test_step_events_carry_the_solved_dlf_loss(models, runners) -> None:
    """Each DLF token's event carries the objective at its solved weights, equal to the reference's; static: None."""
    from logitfusion.fusion import dlf_loss

    dec = make_decoder(runners)
    recipe = RECIPES["dlf_newton"]
    dec.add_request(GenerationRequest("l", PROMPTS[0], recipe, max_new_tokens=4, stop_token_ids=()))
    dec.add_request(GenerationRequest("s", PROMPTS[0], RECIPES["proxy"], max_new_tokens=4, stop_token_ids=()))
    events = []
    while dec.has_work():
        events += dec.step()
    dlf_events = [e for e in events if e.request_id == "l"]
    assert len(dlf_events) == 4 and all(e.loss is not None and e.loss >= 0.0 for e in dlf_events)
    assert all(e.loss is None for e in events if e.request_id == "s")
    ref = naive_decode(models, PROMPTS[0], recipe, vocab_size=V, max_new_tokens=4)
    assert [e.token_id for e in dlf_events] == ref.token_ids
    # the first step's loss recomputed from the reference's fused inputs at the event's alphas
    with torch.inference_mode():
        ids = torch.tensor([PROMPTS[0]])
        lp = {m: torch.log_softmax(models[m](input_ids=ids).logits[:, -1, :V].double(), -1)
              for m in ("large", "small", "expert_a")}
    loss = dlf_loss(lp["large"], lp["small"], lp["expert_a"].unsqueeze(0), torch.tensor([dlf_events[0].alphas]))
    assert float(loss[0]) == pytest.approx(dlf_events[0].loss, rel=1e-3, abs=1e-6)
    assert_no_leaks(runners)


def run_until(dec: Decoder, done, limit: int = 200) -> list:
    """Step until ``done(events so far)``; returns those events."""
    events: list = []
    for _ in range(limit):
        if done(events):
            return events
        events += dec.step()
    raise AssertionError("the decoder did not get there in %d steps" % limit)


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_stalled_runner_parks_only_the_requests_that_read_it(models, runners, when) -> None:
    """Request "b" reads expert_b, which stops answering; "a" does not read it and decodes to the end meanwhile.
    Once expert_b answers, "b" picks up where it was: both outputs equal their solo references."""
    ra, rb = RECIPES["proxy"], RECIPES["static2"]
    ref_a = naive_decode(models, PROMPTS[1], ra, vocab_size=V, max_new_tokens=8).token_ids
    ref_b = naive_decode(models, PROMPTS[0], rb, vocab_size=V, max_new_tokens=8).token_ids
    stalled = dict(runners)
    stall = stalled["expert_b"] = StallingRunner(runners["expert_b"])
    dec = make_decoder(stalled, stall_timeout_s=0.2)
    dec.add_request(GenerationRequest("b", PROMPTS[0], rb, max_new_tokens=8, stop_token_ids=()))
    events = [] if when == "prefill" else dec.step() + dec.step()
    stall.armed = True
    dec.add_request(GenerationRequest("a", PROMPTS[1], ra, max_new_tokens=8, stop_token_ids=()))
    events += run_until(dec, lambda evs: any(e.request_id == "a" and e.finished for e in evs))
    assert dec.pending_models() == {"expert_b"} and len(stall.stalled_plans) == 1
    before = [e.token_id for e in events if e.request_id == "b"]
    assert len(before) == (0 if when == "prefill" else 2)  # nothing for "b" while its expert is stalled
    stall.release.set()
    while dec.has_work():
        events += dec.step()
    assert dec.pending_models() == frozenset()
    assert [e.token_id for e in events if e.request_id == "a"] == ref_a
    assert [e.token_id for e in events if e.request_id == "b"] == ref_b
    assert_no_leaks(runners)


def test_parked_requests_do_not_take_the_batch_places_of_the_others(models, runners) -> None:
    """max_batch_size=1: "b" waits on stalled expert_b; "a" (not reading it) is admitted and finishes meanwhile."""
    ref_a = naive_decode(models, PROMPTS[1], RECIPES["proxy"], vocab_size=V, max_new_tokens=5).token_ids
    stalled = dict(runners)
    stall = stalled["expert_b"] = StallingRunner(runners["expert_b"])
    dec = make_decoder(stalled, stall_timeout_s=0.2, max_batch_size=1)
    stall.armed = True
    dec.add_request(GenerationRequest("b", PROMPTS[0], RECIPES["static2"], max_new_tokens=5, stop_token_ids=()))
    dec.add_request(GenerationRequest("a", PROMPTS[1], RECIPES["proxy"], max_new_tokens=5, stop_token_ids=()))
    events = run_until(dec, lambda evs: any(e.request_id == "a" and e.finished for e in evs))
    assert [e.token_id for e in events if e.request_id == "a"] == ref_a
    assert dec.pending_models() == {"expert_b"} and not [e for e in events if e.request_id == "b"]
    stall.release.set()
    run_until(dec, lambda evs: not dec.has_work())
    assert_no_leaks(runners)


def test_a_request_aborted_while_parked_is_freed_after_the_late_answer(runners) -> None:
    stalled = dict(runners)
    stall = stalled["expert_b"] = StallingRunner(runners["expert_b"])
    dec = make_decoder(stalled, stall_timeout_s=0.2)
    stall.armed = True  # the prefill of "b" on expert_b never answers in time
    dec.add_request(GenerationRequest("b", PROMPTS[2], RECIPES["static2"], max_new_tokens=5, stop_token_ids=()))
    dec.add_request(GenerationRequest("a", PROMPTS[1], RECIPES["proxy"], max_new_tokens=5, stop_token_ids=()))
    events = run_until(dec, lambda evs: dec.pending_models() == {"expert_b"})
    assert dec.abort("b") is True
    events += dec.step()
    assert ("b", "abort") in [(e.request_id, e.finish_reason) for e in events]
    assert runners["expert_b"].sequences() == {}  # the stalled worker has not created "b" yet
    stall.release.set()
    run_until(dec, lambda evs: not dec.has_work())
    assert_no_leaks(runners)  # the late prefill created "b" on expert_b; its release followed


def test_a_stalled_runner_that_then_fails_is_a_failed_step_and_the_retry_is_exact(models, runners) -> None:
    recipe = RECIPES["static2"]
    ref = naive_decode(models, PROMPTS[3], recipe, vocab_size=V, max_new_tokens=6).token_ids
    stalled = dict(runners)
    stall = stalled["expert_b"] = StallingRunner(runners["expert_b"])
    stall.error = RuntimeError("worker lost mid-stall")
    dec = make_decoder(stalled, stall_timeout_s=0.2)
    dec.add_request(GenerationRequest("r", PROMPTS[3], recipe, max_new_tokens=6, stop_token_ids=()))
    tokens = [e.token_id for e in dec.step() + dec.step()]
    stall.armed = True
    assert dec.step() == [] and dec.pending_models() == {"expert_b"}
    stall.release.set()
    with pytest.raises(StepFailed, match="worker lost mid-stall") as err:
        for _ in range(100):
            tokens += [e.token_id for e in dec.step()]
    assert err.value.model == "expert_b" and dec.pending_models() == frozenset()
    while dec.has_work():
        tokens += [e.token_id for e in dec.step()]
    assert tokens == ref
    assert_no_leaks(runners)


def test_a_stalled_draft_model_parks_its_speculative_request(models, runners) -> None:
    recipe = RECIPES["proxy"]
    spec = SpeculativeConfig("expert_a", num_draft_tokens=3)
    ref = naive_decode(models, PROMPTS[1], recipe, vocab_size=V, max_new_tokens=9).token_ids
    ref_other = naive_decode(models, PROMPTS[0], RECIPES["single_large"], vocab_size=V, max_new_tokens=9).token_ids
    stalled = dict(runners)
    stall = stalled["expert_a"] = StallingRunner(runners["expert_a"])
    dec = make_decoder(stalled, stall_timeout_s=0.2)
    dec.add_request(GenerationRequest("s", PROMPTS[1], recipe, max_new_tokens=9, stop_token_ids=(), speculative=spec))
    events = dec.step() + dec.step()
    stall.armed = True  # a draft round of the next step stalls
    dec.add_request(GenerationRequest("o", PROMPTS[0], RECIPES["single_large"], max_new_tokens=9, stop_token_ids=()))
    events += run_until(dec, lambda evs: any(e.request_id == "o" and e.finished for e in evs))
    assert dec.pending_models() == {"expert_a"}
    stall.release.set()
    while dec.has_work():
        events += dec.step()
    assert [e.token_id for e in events if e.request_id == "s"] == ref
    assert [e.token_id for e in events if e.request_id == "o"] == ref_other
    assert_no_leaks(runners)


def test_stall_timeout_is_checked() -> None:
    with pytest.raises(ValueError, match=r"stall_timeout_s=0 must be > 0"):
        Decoder({"m": object()}, stall_timeout_s=0)  # type: ignore[dict-item]


def test_run_yields_results_as_they_finish_refuses_bad_requests_and_times_out(models, runners) -> None:
    """Decoder.run: the one loop to completion. Results in finish order; a refused request is a result
    ("invalid", the error naming the field); a request past timeout_s is aborted ("timeout") and freed; others'
    output is unchanged; closing the iterator early aborts what still runs."""
    recipe = RECIPES["proxy"]
    ref = naive_decode(models, PROMPTS[0], recipe, vocab_size=V, max_new_tokens=3).token_ids
    dec = make_decoder(runners)
    reqs = [GenerationRequest("long", PROMPTS[1], recipe, max_new_tokens=60, stop_token_ids=()),
            GenerationRequest("bad", PROMPTS[0], recipe, max_new_tokens=65, stop_token_ids=()),
            GenerationRequest("short", PROMPTS[0], recipe, max_new_tokens=3, stop_token_ids=())]
    out = list(dec.run(reqs))
    assert [r.request_id for r in out] == ["bad", "short", "long"]
    assert out[0].finish_reason == "invalid" and "max_new_tokens" in out[0].error and "64" in out[0].error
    assert out[1].token_ids == ref and out[2].finish_reason == "length" and len(out[2].token_ids) == 60
    slow = dict(runners)
    slow["small"] = StallingRunner(runners["small"])
    dec = make_decoder(slow, stall_timeout_s=0.05)
    slow["small"].armed = True  # the first plan never answers in time: "t" cannot finish
    (res,) = dec.run([GenerationRequest("t", PROMPTS[0], recipe, max_new_tokens=3)], timeout_s=0.5)
    assert res.finish_reason == "timeout" and res.token_ids == []
    slow["small"].release.set()
    while dec.has_work():
        dec.step()
    assert_no_leaks(runners)
    dec = make_decoder(runners)
    first = dec.run([GenerationRequest("x", PROMPTS[0], recipe, max_new_tokens=3, stop_token_ids=()),
                     GenerationRequest("y", PROMPTS[1], recipe, max_new_tokens=30, stop_token_ids=())])
    assert next(first).request_id == "x"
    first.close()  # "y" still runs: aborted, and its caches freed
    assert dec.live_request_ids() == []
    while dec.has_work():
        dec.step()
    assert_no_leaks(runners)
