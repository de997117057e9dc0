"""`python -m xpar.hf`: upcycle, import and export against transformers' own forward passes.

Every "pretrained" checkpoint is a tiny random model built here with transformers and saved
with save_pretrained (no hub). Weights are drawn wider than transformers' init so that routing
and norms matter; logits are compared in fp32 with atol 1e-5.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from xpar.hf.__main__ import main
from xpar.model import ModelConfig, MoETransformerLM, get_preset
from xpar.persist import TaskInfo, read_model, write_model_dir

V = 128
ATTN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
COMMON = dict(ATTN, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def widen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights std 0.15, norm weights around 1, biases around 0: routing decided by margins
    far above rounding, and every norm and bias visible in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias") or p.dim() == 1:
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.15 * noise)
    return model.eval()


def save_tokenizer(path: Path) -> None:
    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(20)}}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>", unk_token="[UNK]")
    tok.save_pretrained(path)


def hf_checkpoint(
    tmp_path: Path, name: str, model: torch.nn.Module, tokenizer=False, shard: str | None = None
) -> Path:
    path = tmp_path / name
    widen(model).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if tokenizer:
        save_tokenizer(path)
    return path


def xpar_logits(model_dir: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    files = read_model(model_dir)
    model = MoETransformerLM(files.model).eval()
    model.load_state_dict(files.state, strict=True)
    with torch.no_grad():
        return model(tokens_BS).logits


def hf_logits(model: torch.nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens_BS).logits


def assert_one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("xpar: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


# ---- upcycle -------------------------------------------------------------------------------


def llama(**changes) -> torch.nn.Module:
    kw = dict(
        COMMON, intermediate_size=96, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(kw | changes)))


UPCYCLE_CASES = {
    "llama": (lambda: llama(), ["moe.num_experts=4", "moe.top_k=2"]),
    "mistral_tied_first_dense": (
        lambda: transformers.MistralForCausalLM(
            transformers.MistralConfig(
                **COMMON | {"tie_word_embeddings": True}, intermediate_size=96, sliding_window=None
            )
        ),
        ["moe.num_experts=3", "moe.top_k=3", "model.first_k_dense=1", "moe.score_func=sigmoid"],
    ),
    "two_level_learned_groups": (
        lambda: llama(),
        ["moe.num_experts=4", "moe.top_k=2", "moe.router=two_level", "moe.num_groups=2"],
    ),
}


@pytest.mark.parametrize("case", UPCYCLE_CASES)
def test_upcycle_equals_dense_model(tmp_path, case):
    build, overrides = UPCYCLE_CASES[case]
    dense = build()
    src = hf_checkpoint(tmp_path, "dense", dense, tokenizer=True)
    assert main(["upcycle", str(src), str(tmp_path / "moe"), *overrides]) == 0
    files = read_model(tmp_path / "moe")
    assert files.model.moe is not None and files.model.moe.norm_topk_prob
    assert files.tokenizer is not None and (Path(files.tokenizer) / "tokenizer.json").is_file()
    torch.testing.assert_close(
        xpar_logits(tmp_path / "moe", tokens()), hf_logits(dense, tokens()), atol=1e-5, rtol=0
    )
    bank = files.state[f"layers.{files.model.moe_layer_ids()[0]}.ffn.experts.w1"]
    assert torch.equal(bank[0], bank[-1])  # identical experts


def test_upcycle_noise_makes_experts_differ(tmp_path):
    dense = llama()
    src = hf_checkpoint(tmp_path, "dense", dense)
    out = tmp_path / "moe"
    code = main(
        ["upcycle", str(src), str(out), "moe.num_experts=4", "--noise", "0.1", "--seed", "3"]
    )
    assert code == 0
    bank = read_model(out).state["layers.0.ffn.experts.w1"]
    assert not torch.equal(bank[0], bank[1])
    diff = (xpar_logits(out, tokens()) - hf_logits(dense, tokens())).abs().max()
    assert diff > 1e-3


UPCYCLE_ERRORS = {
    "gpt2": ("gpt2", ["moe.num_experts=4"], ["model_type='gpt2'", "llama", "mistral"]),
    "top_k": ("llama", ["moe.num_experts=2", "moe.top_k=3"], ["moe.top_k=3", "num_experts=2"]),
    "norm_topk": (
        "llama",
        ["moe.num_experts=4", "moe.norm_topk_prob=false"],
        ["moe.norm_topk_prob=False"],
    ),
    "capacity": (
        "llama",
        ["moe.num_experts=4", "moe.capacity_factor=1.25"],
        ["moe.capacity_factor=1.25"],
    ),
    "no_experts": ("llama", ["moe.top_k=2"], ["moe.num_experts"]),
    "bad_type": ("llama", ["moe.num_experts=4", "moe.top_k=two"], ["moe.top_k='two' must be int"]),
    "unknown_key": ("llama", ["moe.num_experts=4", "model.d_model=32"], ["'model.d_model'"]),
    "sliding": ("mistral", ["moe.num_experts=4"], ["sliding_window=16"]),
    "rope_scaling": ("rope", ["moe.num_experts=4"], ["rope_scaling", "linear"]),
    "bias": ("bias", ["moe.num_experts=4"], ["attention_bias=True"]),
}


@pytest.mark.parametrize("case", UPCYCLE_ERRORS)
def test_upcycle_refuses_with_one_line(tmp_path, capsys, case):
    kind, overrides, needles = UPCYCLE_ERRORS[case]
    src = tmp_path / "src"
    configs = {
        "gpt2": transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V),
        "llama": transformers.LlamaConfig(**COMMON, intermediate_size=96),
        "mistral": transformers.MistralConfig(**COMMON, intermediate_size=96, sliding_window=16),
        "rope": transformers.LlamaConfig(
            **COMMON,
            intermediate_size=96,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        ),
        "bias": transformers.LlamaConfig(**COMMON, intermediate_size=96, attention_bias=True),
    }
    configs[kind].save_pretrained(src)  # refused before any weight is read
    out = tmp_path / "out"
    assert_one_line_error(capsys, main(["upcycle", str(src), str(out), *overrides]), *needles)
    assert_nothing_written(out)


# ---- import --------------------------------------------------------------------------------


def mixtral(**changes) -> torch.nn.Module:
    kw = dict(COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**(kw | changes)))


MOE = dict(num_experts=4, num_experts_per_tok=2, intermediate_size=48, moe_intermediate_size=32)
IMPORT_CASES = {
    "mixtral": lambda: mixtral(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **COMMON | {"num_hidden_layers": 3},
            **MOE,
            shared_expert_intermediate_size=40,
            mlp_only_layers=[0],
        )
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**COMMON, **MOE, head_dim=32, norm_topk_prob=True)
    ),
    "olmoe": lambda: transformers.OlmoeForCausalLM(
        transformers.OlmoeConfig(
            **COMMON | {"tie_word_embeddings": True},
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=32,
        )
    ),
}
EXPECTED = {
    "mixtral": dict(qk_norm="none", attn_bias=False, first_k_dense=0),
    "qwen2_moe": dict(qk_norm="none", attn_bias=True, first_k_dense=1),
    "qwen3_moe": dict(qk_norm="head", attn_head_dim=32),
    "olmoe": dict(qk_norm="full", tie_embeddings=True),
}


@pytest.mark.parametrize("family", IMPORT_CASES)
def test_import_matches_transformers(tmp_path, family):
    hf = IMPORT_CASES[family]()
    # Mixtral: sharded, with an index file, and a tokenizer.
    mixtral = family == "mixtral"
    src = hf_checkpoint(tmp_path, family, hf, tokenizer=mixtral, shard="100KB" if mixtral else None)
    assert (src / "model.safetensors.index.json").is_file() == mixtral
    out = tmp_path / "xpar"
    assert main(["import", str(src), str(out)]) == 0
    files = read_model(out)
    for field, value in EXPECTED[family].items():
        assert getattr(files.model, field) == value, field
    moe = files.model.moe
    assert moe.router == "topk" and moe.capacity_factor is None
    assert all(not b.any() for k, b in files.state.items() if k.endswith("expert_bias"))
    assert (files.tokenizer is not None) == (family == "mixtral")
    torch.testing.assert_close(
        xpar_logits(out, tokens()), hf_logits(hf, tokens()), atol=1e-5, rtol=0
    )


def test_import_reads_fused_expert_layout(tmp_path):
    """transformers' in-memory layout (experts fused into gate_up_proj/down_proj) on disk."""
    hf = widen(IMPORT_CASES["qwen3_moe"]())
    src = tmp_path / "fused"
    hf.config.save_pretrained(src)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["import", str(src), str(tmp_path / "xpar")]) == 0
    torch.testing.assert_close(
        xpar_logits(tmp_path / "xpar", tokens()), hf_logits(hf, tokens()), atol=1e-5, rtol=0
    )


def test_mixtral_import_export_round_trip_is_identical(tmp_path):
    src = hf_checkpoint(tmp_path, "mixtral", mixtral(), tokenizer=True)
    assert main(["import", str(src), str(tmp_path / "xpar")]) == 0
    assert main(["export", str(tmp_path / "xpar"), str(tmp_path / "back")]) == 0
    before, after = (
        load_file(src / "model.safetensors"),
        load_file(tmp_path / "back/model.safetensors"),
    )
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert (tmp_path / "back/tokenizer.json").is_file()


IMPORT_ERRORS = {
    "clip_qkv": (
        lambda: transformers.OlmoeConfig(**COMMON, num_experts=4, clip_qkv=8.0),
        "clip_qkv=8.0",
    ),
    "o_bias": (
        lambda: transformers.Qwen3MoeConfig(**COMMON, **MOE, attention_bias=True),
        "attention_bias=True",
    ),
    "sliding": (
        lambda: transformers.MixtralConfig(**COMMON, sliding_window=16),
        "sliding_window=16",
    ),
    "rope_scaling": (
        lambda: transformers.MixtralConfig(
            **COMMON, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
        ),
        "rope_scaling",
    ),
    "placement": (
        lambda: transformers.Qwen2MoeConfig(
            **COMMON | {"num_hidden_layers": 4}, **MOE, mlp_only_layers=[1]
        ),
        "mlp_only_layers=[1]",
    ),
    "llama": (lambda: transformers.LlamaConfig(**COMMON), "model_type='llama'"),
}


@pytest.mark.parametrize("case", IMPORT_ERRORS)
def test_import_refuses_with_one_line(tmp_path, capsys, case):
    build, needle = IMPORT_ERRORS[case]
    build().save_pretrained(tmp_path / "src")  # refused on its config, before the weights
    out = tmp_path / "out"
    assert_one_line_error(capsys, main(["import", str(tmp_path / "src"), str(out)]), needle)
    assert_nothing_written(out)


# ---- export --------------------------------------------------------------------------------


def tiny(**changes) -> ModelConfig:
    cfg = dataclasses.replace(get_preset("tiny"), n_layers=2, vocab_size=V, max_seq_len=64)
    moe = changes.pop("moe", {})
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe), **changes)


EXPORT_CASES = {
    "mixtral": (tiny(moe=dict(norm_topk_prob=True)), "MixtralForCausalLM"),
    # norm_topk_prob=False, ungated shared expert, a dense layer, q/k/v biases, tied head.
    "qwen2_moe": (
        tiny(first_k_dense=1, attn_bias=True, tie_embeddings=True, moe=dict(num_shared_experts=1)),
        "Qwen2MoeForCausalLM",
    ),
    "qwen3_moe": (tiny(qk_norm="head", attn_head_dim=32), "Qwen3MoeForCausalLM"),
    "olmoe": (tiny(qk_norm="full", moe=dict(capacity_factor=8.0)), "OlmoeForCausalLM"),
    "llama": (dataclasses.replace(tiny(), moe=None), "LlamaForCausalLM"),
}


def trained_model_dir(path: Path, cfg: ModelConfig, steps: int = 3) -> Path:
    """A model dir holding `cfg` after a few AdamW steps, so no weight is at its init."""
    model = MoETransformerLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        out = model(tokens(10 + step), tokens(20 + step))
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
    return write_model_dir(path, model.state_dict(), cfg)


@pytest.mark.parametrize("family", EXPORT_CASES)
def test_export_matches_transformers(tmp_path, capsys, family):
    cfg, architecture = EXPORT_CASES[family]
    src = trained_model_dir(tmp_path / "xpar", cfg)
    assert main(["export", str(src), str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert architecture in printed and ("capacity_factor" in printed) == (family == "olmoe")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == architecture
    torch.testing.assert_close(
        hf_logits(hf, tokens()), xpar_logits(src, tokens()), atol=1e-5, rtol=0
    )


EXPORT_ERRORS = {
    "two_level": (
        tiny(moe=dict(router="two_level", num_groups=4, top_groups=2)),
        "moe.router='two_level'",
    ),
    "shared_qk_head": (
        tiny(qk_norm="head", moe=dict(num_shared_experts=1)),
        "moe.num_shared_experts=1",
    ),
    "expert_bias": (tiny(moe=dict(bias_update_rate=0.1)), "layers.0.ffn.router.expert_bias"),
    "sigmoid": (tiny(moe=dict(score_func="sigmoid")), "moe.score_func='sigmoid'"),
    "task": (tiny(), "task='classify'"),
}


@pytest.mark.parametrize("case", EXPORT_ERRORS)
def test_export_refuses_with_one_line(tmp_path, capsys, case):
    cfg, needle = EXPORT_ERRORS[case]
    model = MoETransformerLM(cfg)
    if case == "expert_bias":
        model(tokens())
        model.update_expert_bias()
    task = TaskInfo(kind="classify", labels=["a", "b"]) if case == "task" else None
    src = write_model_dir(tmp_path / "xpar", model.state_dict(), cfg, task=task)
    out = tmp_path / "hf"
    assert_one_line_error(capsys, main(["export", str(src), str(out)]), needle)
    assert_nothing_written(out)


def test_export_refuses_non_empty_out_dir(tmp_path, capsys):
    src = write_model_dir(tmp_path / "xpar", MoETransformerLM(tiny()).state_dict(), tiny())
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(capsys, main(["export", str(src), str(out)]), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
