"""The Hydra config tree: every option composes into a checked TrainConfig; bad values fail
with one line naming the field."""

from pathlib import Path

import pytest

from xpar.checks import UserError
from xpar.config import CONF_DIR
from xpar.data.config import HFTextDataConfig, SyntheticDataConfig
from xpar.model import PRESETS, get_preset

from jobs import build

GROUPS = [
    "moe",
    "data",
    "optim",
    "trainer",
    "parallel",
    "deepspeed",
    "logger",
    "launcher",
    "experiment",
    "debug",
]
EXTRA = {
    "data=hf_text": ["data.path=text", "data.tokenizer=byt5"],
    "data=hf_labels": ["data.path=csv", "data.tokenizer=byt5", "task=classify"],  # labelled
}


REFUSED = {"deepspeed=zero3"}  # a one-line refusal (tests/test_zero.py)


def options():
    for group in GROUPS:
        for f in sorted(Path(CONF_DIR, group).glob("*.yaml")):
            if f"{group}={f.stem}" not in REFUSED:
                yield f"{group}={f.stem}"
    for name in PRESETS:
        yield f"model={name}"


@pytest.mark.parametrize("option", list(options()))
def test_every_group_option_composes(option):
    cfg = build([option, *EXTRA.get(option, [])])
    assert cfg.model_config().d_model == cfg.model.d_model
    if cfg.moe is not None:
        assert cfg.moe.d_model == cfg.model.d_model


def test_every_group_has_an_option():
    for group in GROUPS:
        assert list(Path(CONF_DIR, group).glob("*.yaml")), group


def test_default_job_is_tiny_moe_on_synthetic_data():
    cfg = build([])
    assert isinstance(cfg.data, SyntheticDataConfig)
    assert cfg.model_config() == get_preset("tiny")
    assert cfg.data.vocab_size == cfg.model.vocab_size


@pytest.mark.parametrize("name", PRESETS)
def test_model_option_is_the_python_preset(name):
    assert build([f"model={name}"]).model_config() == get_preset(name)


def test_moe_options_change_only_routing():
    two = build(["moe=two_level"]).model_config().moe
    assert (two.router, two.num_groups, two.top_groups) == ("two_level", 4, 2)
    assert two.num_experts == get_preset("tiny").moe.num_experts
    assert build(["moe=dense"]).model_config().moe is None
    assert build(["moe=capacity"]).moe.capacity_factor == 1.25


def test_model_size_override_carries_into_the_moe_layer():
    cfg = build(["model.d_model=128", "model.n_heads=8"])
    assert cfg.model_config().moe.d_model == 128


def test_dense_experiment_matches_moe_active_ffn():
    moe = get_preset("tiny").moe
    dense = build(["experiment=synthetic_dense"]).model_config()
    assert dense.moe is None and dense.d_ff == moe.top_k * moe.d_ff


def test_local_text_preset_is_hf_text():
    cfg = build(["data=local_text"])
    assert isinstance(cfg.data, HFTextDataConfig) and cfg.data.tokenizer == "byt5"


BAD = [
    (["data.seq_len=1000"], r"data\.seq_len=1000 exceeds model\.max_seq_len=128"),
    (["data.batch_size=0"], r"data\.batch_size=0 must be >= 1"),
    (["moe.top_k=9"], r"moe\.top_k=9 must be in \[1, num_experts=8\]"),
    (["model.n_heads=3"], r"model\.d_model=64 is not divisible by model\.n_heads=3"),
    (["optim.lr=0"], r"optim\.lr=0\.0 must be > 0"),
    (["optim.schedule=step"], r"optim\.schedule='step' is not one of"),
    (["trainer.device=tpu"], r"trainer\.device='tpu' is not one of"),
    (["trainer.max_steps=0"], r"trainer\.max_steps=0 must be >= 1"),
    (["data.vocab_size=300"], r"data\.vocab_size=300 exceeds model\.vocab_size=256"),
    (["logger.mode=cloud"], r"logger\.mode='cloud' is not one of"),
    (["deepspeed.stage=4"], r"deepspeed\.stage=4 is not one of \[0, 1, 2, 3\]"),
    (["deepspeed.reduce_bucket_size=0"], r"deepspeed\.reduce_bucket_size=0 must be >= 1"),
    (["trainer.precision=fp16"], r"trainer\.precision=fp16 needs loss scaling"),
    (["data=hf_text"], r"missing mandatory value: path"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[o[0] for o, _ in BAD])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        build(overrides)
    assert "\n" not in str(info.value)


def test_accumulation_from_global_and_micro_batch():
    cfg = build(["data.batch_size=32", "data.micro_batch_size=8"])
    assert cfg.data.accumulation(dp_world=1) == (8, 4)
    assert cfg.data.accumulation(dp_world=2) == (8, 2)
    with pytest.raises(UserError, match=r"data\.micro_batch_size=8 must divide"):
        cfg.data.accumulation(dp_world=8)
    with pytest.raises(UserError, match=r"data\.batch_size=32 is not divisible by the 3"):
        cfg.data.accumulation(dp_world=3)


def test_resume_accepts_bools_and_paths():
    assert build(["trainer.resume=true"]).trainer.resume is True
    assert build(["trainer.resume=false"]).trainer.resume is False
    assert build(["trainer.resume=runs/x"]).trainer.resume == "runs/x"
