"""Fine-tuning controls in the trainer: freeze policies (frozen tensors stay bitwise equal),
trainable counts, the head's learning rate, trainer.init_from (and resume winning over it),
early stopping and the best model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_tasks import QUICK, make

from xpar.persist import read_model
from xpar.tasks.config import FinetuneConfig, TaskConfig

from distributed import torchrun

SMALL = [*QUICK, "data.num_train=256", "data.num_val=32", "trainer.save_every=100"]
CLASSIFY = [*SMALL, "task=classify"]


def state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def expected_trainable(names: list[str], policy: str) -> set[str]:
    head = {n for n in names if n.startswith("head.")} or {"lm_head.weight"}
    if policy == "head":
        return head
    part = ".experts." if policy == "experts" else ".router.gate."
    return head | {n for n in names if part in n}


@pytest.mark.parametrize(
    "task,policy",
    [("classify", "head"), ("classify", "experts"), ("classify", "router+head"), ("lm", "head")],
)
def test_freeze_policy_leaves_frozen_tensors_bitwise_unchanged(tmp_path, caplog, task, policy):
    caplog.set_level("INFO")
    # aux_free: the routers' balancing biases move only while the routers train
    trainer = make(tmp_path, [*SMALL, f"task={task}", f"finetune.train={policy}", "moe=aux_free"])
    params = dict(trainer.model.named_parameters())
    trainable = expected_trainable(list(params), policy)
    assert {n for n, p in params.items() if p.requires_grad} == trainable
    n_train = sum(params[n].numel() for n in trainable)
    n_total = sum(p.numel() for p in params.values())
    assert f"trainable {n_train} / total {n_total} parameters" in caplog.text
    before = state(trainer)
    for _ in range(3):
        assert not trainer.train_step(trainer.data.train.next_step()).skipped
    after = state(trainer)
    for name, tensor in before.items():
        moved = not torch.equal(tensor, after[name])
        if name in trainable:
            assert moved, f"{name} trains under finetune.train={policy} but did not change"
        elif name.endswith("expert_bias"):
            assert moved == (policy == "router+head"), name
        elif "pending_load" not in name:
            assert not moved, f"{name} is frozen under finetune.train={policy} but changed"


def test_head_lr_puts_the_head_in_groups_of_its_own(tmp_path):
    trainer = make(tmp_path, [*CLASSIFY, "finetune.head_lr=0.01", "optim.lr=0.001"])
    head = {id(trainer.model.head.weight), id(trainer.model.head.bias)}
    for group in trainer.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head or not ids & head
        assert group["initial_lr"] == (0.01 if ids <= head else 0.001)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(
        list(trainer.model.parameters())
    )


def test_init_from_an_lm_run_loads_the_backbone_with_a_fresh_head(tmp_path):
    steps = ["trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=2"]
    make(tmp_path / "lm", [*SMALL, *steps]).fit()
    lm = read_model(tmp_path / "lm").state
    init = f"trainer.init_from={tmp_path / 'lm'}"
    tuned = make(tmp_path / "cls", [*CLASSIFY, *steps, init])
    fresh = make(tmp_path / "fresh", CLASSIFY)
    got = state(tuned)
    assert set(lm) - set(got) == {"lm_head.weight"}
    assert set(got) - set(lm) == {"head.weight", "head.bias"}
    for name, tensor in lm.items():
        if name != "lm_head.weight":
            assert torch.equal(got[name], tensor), name
    for name in ("head.weight", "head.bias"):
        assert torch.equal(got[name], state(fresh)[name])
    assert not torch.equal(got["embed.weight"], state(fresh)["embed.weight"])
    tuned.fit()
    # A restart resumes its own checkpoint: init_from is ignored then.
    again = make(tmp_path / "cls", [*CLASSIFY, *steps, init, "trainer.resume=true"])
    assert again.step == 2
    saved = read_model(tmp_path / "cls/checkpoints/step_2").state
    assert all(torch.equal(state(again)[k], v) for k, v in saved.items())
    assert not torch.equal(saved["embed.weight"], lm["embed.weight"])


def scripted(trainer, values: list[float], snapshots: dict):
    """Replace evaluation with `values` of val_accuracy, one per evaluation, and keep the
    model's state at each."""
    C = len(trainer.data.labels)
    L, E = len(trainer.model_cfg.moe_layer_ids()), trainer.model_cfg.moe.num_experts

    def evaluate(forward, tally):
        snapshots[trainer.step] = state(trainer)
        value = values[len(snapshots) - 1]
        metrics = {"val_loss": 1.0 - value, "val_accuracy": value, "val_macro_f1": value}
        return metrics, np.full((L, E), 1.0 / E), np.eye(C).flatten()

    trainer.validation.evaluate = evaluate


def test_early_stop_after_patience_and_keep_best(tmp_path):
    overrides = [*CLASSIFY, "trainer.max_steps=20", "trainer.eval_every=2", "trainer.save_every=10"]
    trainer = make(tmp_path, [*overrides, "finetune.patience=2", "finetune.keep_best=true"])
    snapshots: dict[int, dict] = {}
    scripted(trainer, [0.5, 0.7, 0.6, 0.7, 0.9], snapshots)  # best at step 4; 6, 8 no better
    result = trainer.fit()
    assert result.early_stopped and not result.stopped_early
    assert result.step == 8 and sorted(snapshots) == [2, 4, 6, 8]
    assert result.best == {"metric": "val_accuracy", "best": 0.7, "best_step": 4, "bad_evals": 2}
    assert (tmp_path / "checkpoints/step_8/meta.json").exists()  # the final save
    assert json.loads((tmp_path / "best/best.json").read_text()) == {
        "step": 4, "metric": "val_accuracy", "value": 0.7}  # fmt: skip
    best = read_model(tmp_path / "best")
    assert best.task.kind == "classify" and best.task.labels == trainer.data.labels
    assert best.state.keys() == snapshots[4].keys()
    assert all(torch.equal(best.state[k], v) for k, v in snapshots[4].items())
    assert not torch.equal(best.state["head.weight"], snapshots[8]["head.weight"])
    assert (tmp_path / "label_report.json").exists()
    # A resumed (requeued) run that had stopped early stays stopped: no step, no checkpoint.
    again = make(tmp_path, [*overrides, "finetune.patience=2", "trainer.resume=true"])
    resumed = again.fit()
    assert resumed.early_stopped and resumed.step == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_8"]


def test_monitor_defaults_and_modes():
    ft = FinetuneConfig()
    assert ft.monitored(TaskConfig("lm"), floor=True) == ("val_loss", "min")
    assert ft.monitored(TaskConfig("classify"), floor=False) == ("val_accuracy", "max")
    assert ft.monitored(TaskConfig("tag"), floor=False) == ("val_f1", "max")
    assert FinetuneConfig(monitor="val_gap").monitored(TaskConfig("lm"), True)[1] == "min"
    assert (
        FinetuneConfig(monitor="val_loss", mode="max").monitored(TaskConfig("tag"), False)[1]
        == "max"
    )


@pytest.mark.distributed
def test_frozen_parameters_under_zero2_at_ep2(tmp_path):
    """DeepSpeed with frozen experts (plain ZeRO: no expert group to partition) on 2 ranks at
    EP=2: between two checkpoints only the routers and the head move, and the checkpoints read
    back whole (every expert bank, frozen ones included) for init_from and export."""
    args = [
        *[a for a in SMALL if not a.startswith("trainer.save_every")],
        "task=classify",
        "deepspeed=zero2",
        "parallel.ep_size=2",
        "finetune.train=router+head",
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.eval_every=4",
        "run_name=z",
    ]
    proc = torchrun(args, 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "runs" / "z" / "checkpoints"
    first, last = read_model(ckpts / "step_2"), read_model(ckpts / "step_4")
    assert first.state["layers.0.ffn.experts.w1"].shape[0] == first.model.moe.num_experts
    moved = {k for k in first.state if not torch.equal(first.state[k], last.state[k])}
    assert moved == {"head.weight", "head.bias"} | {
        f"layers.{i}.ffn.router.gate.weight" for i in first.model.moe_layer_ids()
    }
