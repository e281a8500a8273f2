"""Task arithmetic: S + sum_t lambda_t (E_t - S), checked on tiny random Llama checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from logitfusion.models.zoo.merge import merge_experts


def _config(hidden: int = 16) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=40,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden // 2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )


def _save(model: LlamaForCausalLM, d: Path) -> Path:
    model.save_pretrained(str(d))
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return d


@pytest.fixture()
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    base_dir = _save(base, tmp_path / "small")
    experts = []
    for i in range(2):
        torch.manual_seed(100 + i)
        e = LlamaForCausalLM(_config())
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.01 * torch.randn_like(p))
        experts.append(_save(e, tmp_path / f"expert_{i}"))
    return base_dir, experts


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_zero_lambdas_reproduce_the_base_exactly(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = family
    out = merge_experts(base, experts, [0.0, 0.0], tmp_path / "merged")
    merged, ref = _weights(out), _weights(base)
    assert set(merged) == set(ref)
    assert all(torch.equal(merged[k], ref[k]) for k in ref)
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert json.loads((out / "merge.json").read_text())["lambdas"] == [0.0, 0.0]
    LlamaForCausalLM.from_pretrained(str(out))  # loads like any checkpoint


def test_one_expert_with_lambda_one_reproduces_it(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = family
    out = merge_experts(base, [experts[1]], [1.0], tmp_path / "merged")
    merged, ref = _weights(out), _weights(experts[1])
    assert all(torch.equal(merged[k], ref[k]) for k in ref)


def test_two_experts_add_their_deltas(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = family
    out = merge_experts(base, experts, [0.5, 0.25], tmp_path / "merged")
    s, e0, e1, m = _weights(base), _weights(experts[0]), _weights(experts[1]), _weights(out)
    for k in s:
        expect = s[k] + 0.5 * (e0[k] - s[k]) + 0.25 * (e1[k] - s[k])
        torch.testing.assert_close(m[k], expect, rtol=0, atol=1e-6)
    assert not torch.equal(m["model.norm.weight"], s["model.norm.weight"])


def test_shape_mismatch_is_named(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, _ = family
    torch.manual_seed(1)
    wide = _save(LlamaForCausalLM(_config(hidden=24)), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"config mismatch: .*wide differs from the base .*hidden_size=24 \(base: 16\)"):
        merge_experts(base, [wide], [1.0], tmp_path / "merged")


def test_bad_arguments_are_refused(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = family
    with pytest.raises(ValueError, match="2 lambdas for 1 experts"):
        merge_experts(base, experts[:1], [1.0, 1.0], tmp_path / "m")
    with pytest.raises(ValueError, match="expert_dirs is empty"):
        merge_experts(base, [], [], tmp_path / "m")
    with pytest.raises(ValueError, match=r"lambdas\[0\] = nan"):
        merge_experts(base, experts[:1], [float("nan")], tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        merge_experts(base, [tmp_path / "nowhere"], [1.0], tmp_path / "m")
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge_experts(base, experts[:1], [1.0], base)
    (experts[0] / "tokenizer.json").write_text('{"other": 1}')
    with pytest.raises(ValueError, match="not the same tokenizer"):
        merge_experts(base, experts[:1], [1.0], tmp_path / "m")


def test_merge_main_cli_entry(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    import argparse

    from logitfusion.models.zoo.cli import merge_main

    base, experts = family
    args = argparse.Namespace(base=str(base), experts=[str(e) for e in experts], lambdas=[0.0, 0.0], out=str(tmp_path / "o"))
    assert merge_main(args) == 0
    assert torch.equal(_weights(tmp_path / "o")["model.norm.weight"], _weights(base)["model.norm.weight"])
