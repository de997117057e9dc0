"""Model dirs (atomic, refused when they would overwrite), weights-only initialisation from
them and from run checkpoints, the run adopting the weights' architecture, and what each
fine-tuning policy trains."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from xpar.checks import UserError
from xpar.compose import adopt_architecture
from xpar.model import MoETransformerLM, get_preset
from xpar.model.mla import MLAConfig
from xpar.model.trainable import apply_policy, head_names, routers_frozen, trainable_names
from xpar.parallel.config import ParallelConfig
from xpar.parallel.mesh import init_mesh
from xpar.parallel.parallelize import parallelize
from xpar.persist import TaskInfo, read_model, read_model_info, write_model_dir
from xpar.tasks.config import TaskConfig
from xpar.training.checkpointing import Checkpoints
from xpar.training.finetune import architecture_changes, load_init_weights, trainable_counts
from xpar.training.optim import build_optimizer
from xpar.training.plain import PlainBackend

from jobs import compose_job


def tiny_model(seed: int = 0, **moe_changes) -> MoETransformerLM:
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    cfg.moe = dataclasses.replace(cfg.moe, **moe_changes)
    return MoETransformerLM(cfg)


def single_process(model: MoETransformerLM, train: str = "all"):
    mesh = init_mesh(ParallelConfig(), model.cfg.moe, torch.device("cpu"))
    return parallelize(model, mesh, ParallelConfig(), train=train)


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_model_dir_round_trip_and_refusals(tmp_path):
    model = tiny_model()
    out = tmp_path / "m"
    task = TaskInfo("classify", ["neg", "pos"], "mean")
    write_model_dir(out, model.state_dict(), model.cfg, task, source="test")
    files = read_model(out)
    assert files.model == model.cfg and files.task == task and files.tokenizer is None
    for k, v in model.state_dict().items():
        assert torch.equal(files.state[k], v), k
    before = dir_bytes(out)
    with pytest.raises(UserError, match="is not empty"):
        write_model_dir(out, tiny_model(1).state_dict(), model.cfg)
    assert dir_bytes(out) == before
    # A write that fails part-way (an unloadable tokenizer) leaves no dir and no temp dir.
    with pytest.raises(UserError, match="tokenizer"):
        write_model_dir(tmp_path / "t", model.state_dict(), model.cfg, tokenizer=tmp_path / "no")
    assert sorted(os.listdir(tmp_path)) == ["m"]
    write_model_dir(out, tiny_model(1).state_dict(), model.cfg, overwrite=True)
    assert dir_bytes(out) != before
    assert sorted(os.listdir(tmp_path)) == ["m"]


def run_dir_with_checkpoint(tmp_path: Path, model: MoETransformerLM) -> Path:
    """A run dir holding a checkpoint at step 3, as the trainer saves it."""
    run = tmp_path / "run"
    backend = PlainBackend(single_process(model), get_optim(), None)
    checkpoints = Checkpoints(run, backend.pm, model.cfg, None, keep=0)
    checkpoints.save(3, backend, TaskInfo(), {"step": 3})
    return run


def test_a_corrupt_weights_file_is_one_line(tmp_path):
    model = tiny_model()
    write_model_dir(tmp_path / "m", model.state_dict(), model.cfg)
    shard = sorted((tmp_path / "m" / "state").iterdir())[0]
    os.truncate(shard, 1000)
    with pytest.raises(UserError, match=f"m is incomplete or corrupt: state/{shard.name} has"):
        read_model(tmp_path / "m")


def test_read_model_from_run_checkpoint(tmp_path):
    model = tiny_model(2)
    run = run_dir_with_checkpoint(tmp_path, model)
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_3"):
        files = read_model(path)
        assert files.path == run / "checkpoints" / "step_3"
        assert files.model == model.cfg and files.task.kind == "lm"
        assert torch.equal(files.state["layers.1.ffn.experts.w2"], model.layers[1].ffn.experts.w2)
    with pytest.raises(UserError, match="no such model dir"):
        read_model(tmp_path / "missing")
    with pytest.raises(UserError, match="neither a model dir"):
        read_model(tmp_path)


def test_load_init_weights_is_weights_only_and_checks_shapes(tmp_path):
    source = tiny_model(3)
    write_model_dir(tmp_path / "m", source.state_dict(), source.cfg)
    target = tiny_model(4)
    pm = single_process(target)
    line = load_init_weights(pm, str(tmp_path / "m"), TaskConfig(), None)
    assert "initialised from" in line
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    # Routing knobs may differ (and are reported); shapes may not.
    knob = tiny_model(5, capacity_factor=1.25)
    assert "moe.capacity_factor (None -> 1.25)" in load_init_weights(
        single_process(knob), str(tmp_path / "m"), TaskConfig(), None
    )
    wider = tiny_model(5, d_ff=32)
    with pytest.raises(UserError, match="shapes differ.*experts.w1"):
        load_init_weights(single_process(wider), str(tmp_path / "m"), TaskConfig(), None)
    write_model_dir(tmp_path / "c", source.state_dict(), source.cfg, TaskInfo("classify", ["a"]))
    with pytest.raises(UserError, match="task=classify model, which has no LM head"):
        load_init_weights(single_process(tiny_model(6)), str(tmp_path / "c"), TaskConfig(), None)


def test_policies_freeze_what_they_should():
    model = tiny_model(7)
    every = {n for n, _ in model.named_parameters()}
    assert trainable_names(model, "all") == every
    assert head_names(model) == {"lm_head.weight"} == trainable_names(model, "head")
    experts = trainable_names(model, "experts") - {"lm_head.weight"}
    assert experts and all(".ffn.experts.w" in n for n in experts)
    assert len(experts) == 3 * len(model.moe_layers())
    routers = trainable_names(model, "router+head") - {"lm_head.weight"}
    assert routers == {f"layers.{i}.ffn.router.gate.weight" for i in range(4)}
    apply_policy(model, "router+head")
    assert not routers_frozen(model)
    trainable, total = trainable_counts(model)
    assert total == model.num_params()
    assert trainable == sum(dict(model.named_parameters())[n].numel() for n in routers) + (
        model.lm_head.weight.numel()
    )
    apply_policy(model, "head")
    assert routers_frozen(model)
    with pytest.raises(ValueError, match="finetune.train='norms'"):
        trainable_names(model, "norms")


def test_frozen_weights_stay_bitwise_and_head_lr_groups():
    model = tiny_model(8, bias_update_rate=0.1)
    pm = single_process(model, train="head")
    opt = build_optimizer(model, get_optim(), torch.device("cpu"), head_lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5]  # only the head trains, at head_lr
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 256, (4, 17))
    for _ in range(3):
        out = pm.module(tokens[:, :-1], targets_BS=tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        pm.update_expert_bias()
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(after[k], v)
        assert changed == (k == "lm_head.weight"), k  # expert biases stay put too
    groups = build_optimizer(tiny_model(9), get_optim(), torch.device("cpu"), head_lr=0.5)
    lrs = [g["lr"] for g in groups.param_groups]
    assert lrs == [1e-3, 1e-3, 0.5]  # dense decay, no decay, then the head (a matrix)


def get_optim():
    from xpar.config import OptimConfig

    return OptimConfig(lr=1e-3)


def test_run_adopts_the_weights_architecture(tmp_path):
    source = tiny_model(10, top_k=3)
    source.cfg.n_layers = 4
    write_model_dir(tmp_path / "m", source.state_dict(), source.cfg)
    assert read_model_info(tmp_path / "m")[0].moe.top_k == 3
    job = compose_job(["model.d_model=32", f"trainer.init_from={tmp_path / 'm'}"])
    given = ["moe.capacity_factor=2.0", f"trainer.init_from={tmp_path / 'm'}"]
    job.moe.capacity_factor = 2.0
    adopt_architecture(job, given)
    assert job.model.d_model == 64 and job.moe.top_k == 3  # from the weights
    assert job.moe.capacity_factor == 2.0  # the command line's own value wins
    # A moe=NAME option's own keys win too (moe=capacity sets capacity_factor 1.25).
    job = compose_job(["moe=capacity", f"trainer.init_from={tmp_path / 'm'}"])
    adopt_architecture(job, ["moe=capacity", f"trainer.init_from={tmp_path / 'm'}"])
    assert job.moe.capacity_factor == 1.25 and job.moe.top_k == 3
    job = compose_job(["model=tiny", "model.d_model=32", "moe.d_ff=16"])
    job.trainer.init_from = str(tmp_path / "m")
    adopt_architecture(job, ["model=tiny", "model.d_model=32"])
    assert job.model.d_model == 32  # model=NAME: the run keeps its own architecture
    assert architecture_changes(source.cfg, source.cfg) == []


def test_run_adopts_multi_head_latent_attention(tmp_path):
    cfg = dataclasses.replace(
        get_preset("tiny"),
        n_kv_heads=None,
        mla=MLAConfig(
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
        ),
    )
    write_model_dir(tmp_path / "m", MoETransformerLM(cfg).state_dict(), cfg)
    job = compose_job([f"trainer.init_from={tmp_path / 'm'}"])
    assert job.model.mla is None
    adopt_architecture(job, [f"trainer.init_from={tmp_path / 'm'}"])
    assert job.model.mla.kv_lora_rank == 16
    assert read_model_info(tmp_path / "m")[0] == cfg
