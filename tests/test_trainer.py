"""The training loop in-process: exact resume, skipped non-finite steps, presets, accumulation."""

import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from xpar.checks import UserError
from xpar.config import CONF_DIR
from xpar.training.trainer import Trainer, TrainingDiverged

from jobs import FAST, build, compose_job


def make(run_dir: Path, overrides: list[str]) -> Trainer:
    config = OmegaConf.to_container(compose_job(FAST + overrides), resolve=True)
    return Trainer(build(FAST + overrides), run_dir, config)


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, s in trainer.optimizer.state_dict()["state"].items():
        state.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
    return state


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


RESUME = [
    "trainer.max_steps=20",
    "trainer.log_every=1",
    "trainer.eval_every=100",
    "trainer.save_every=100",
    "data.micro_batch_size=4",  # two accumulation micro-steps
    "moe=aux_free",  # balancing-bias buffers must come back too
    "moe.jitter_eps=0.01",  # router jitter draws from the RNG every step
]


def test_stop_and_resume_gives_bitwise_equal_losses(tmp_path):
    straight = make(tmp_path / "a", RESUME).fit()
    first = make(tmp_path / "b", RESUME).fit(stop_at=10)
    assert first.stopped_early and sorted(first.losses) == list(range(1, 11))
    assert (tmp_path / "b/checkpoints/step_10/meta.json").exists()
    resumed = make(tmp_path / "b", RESUME + ["trainer.resume=true"])
    assert resumed.step == 10
    second = resumed.fit()
    assert second.losses == {s: straight.losses[s] for s in range(11, 21)}
    assert second.val_loss == straight.val_loss
    bias = [layer.router.expert_bias for layer in resumed.model.moe_layers()]
    assert any(torch.count_nonzero(b) for b in bias)
    a = make(tmp_path / "a", RESUME + ["trainer.resume=true"])  # straight run's final state
    assert_same(snapshot(a), snapshot(resumed))
    lines_a = (tmp_path / "a/metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b/metrics.jsonl").read_text().splitlines()
    assert len(lines_a) == len(lines_b) == 21  # 20 steps + the final evaluation


def test_slurm_warning_under_submitit_saves_then_hands_over_to_submitit(tmp_path, monkeypatch):
    """launcher=slurm: SIGUSR2 (Slurm's warning before the time limit) stops the loop like
    SIGTERM, and submitit's own handler (which requeues the job) runs after the save."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls = []
    ckpts = tmp_path / "a/checkpoints"

    def submitit_handler(signum, frame):
        calls.append((signum, sorted(p.name for p in ckpts.iterdir())))

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        trainer = make(tmp_path / "a", ["trainer.max_steps=50", "trainer.save_every=100"])
        step = trainer.train_step

        def warned_at_step_3(batches):
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)
            return step(batches)

        trainer.train_step = warned_at_step_3
        result = trainer.fit()
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # restored
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert result.stopped_early and result.step == 3
    assert calls == [(signal.SIGUSR2, ["step_3"])]


def test_a_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path):
    make(tmp_path, ["trainer.max_steps=2"]).fit()
    with pytest.raises(UserError, match="already holds checkpoints; pass trainer.resume=true"):
        make(tmp_path, ["trainer.max_steps=2"])


def test_resume_from_an_explicit_path(tmp_path):
    make(tmp_path / "a", ["trainer.max_steps=4", "trainer.save_every=2"]).fit()
    t = make(tmp_path / "b", ["trainer.max_steps=6", f"trainer.resume={tmp_path}/a/checkpoints"])
    assert t.step == 4
    t = make(
        tmp_path / "c", ["trainer.max_steps=6", f"trainer.resume={tmp_path}/a/checkpoints/step_2"]
    )
    assert t.step == 2
    with pytest.raises(UserError, match="no such checkpoint"):
        make(tmp_path / "d", [f"trainer.resume={tmp_path}/nowhere"])


def poison(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the LM loss NaN whenever the trainer is at one of `bad_steps` (0-based)."""
    forward = trainer.model.forward

    def nan_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = nan_forward


def test_nan_loss_skips_the_step_and_leaves_weights_unchanged(tmp_path):
    trainer = make(tmp_path, ["trainer.max_steps=6", "moe=aux_free"])
    poison(trainer, {3})
    for _ in range(3):
        assert not trainer.train_step(trainer.data.train.next_step()).skipped
        trainer.step += 1
    before = snapshot(trainer)
    bias = [layer.router.expert_bias.clone() for layer in trainer.model.moe_layers()]
    r = trainer.train_step(trainer.data.train.next_step())
    assert r.skipped and r.loss != r.loss  # NaN
    assert_same(before, snapshot(trainer))
    for layer, b in zip(trainer.model.moe_layers(), bias, strict=True):
        assert torch.equal(layer.router.expert_bias, b)
        assert torch.count_nonzero(layer.router.pending_load) == 0
    trainer.step += 1
    assert not trainer.train_step(trainer.data.train.next_step()).skipped
    assert not torch.equal(before["model.embed.weight"], trainer.model.embed.weight)


def test_a_run_of_non_finite_steps_stops_naming_the_step(tmp_path):
    trainer = make(tmp_path, ["trainer.max_steps=20", "trainer.max_bad_steps=3"])
    poison(trainer, set(range(4, 100)))
    with pytest.raises(TrainingDiverged, match=r"stopping at step 7: 3 consecutive steps"):
        trainer.fit()
    assert trainer.bad_steps == 3


def test_isolated_bad_steps_are_counted_and_training_goes_on(tmp_path):
    trainer = make(
        tmp_path, ["trainer.max_steps=8", "trainer.max_bad_steps=2", "trainer.log_every=1"]
    )
    poison(trainer, {2, 5})
    result = trainer.fit()
    assert result.step == 8 and result.skipped_steps == 2
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-2]
    assert '"skipped_steps": 2' in last


def test_token_ids_beyond_the_vocab_are_caught_before_the_model(tmp_path):
    trainer = make(tmp_path, ["trainer.max_steps=2"])
    batch = trainer.data.train.next_step()
    batch[0][0, 3] = trainer.model_cfg.vocab_size
    with pytest.raises(UserError, match=r"token id 256 is outside \[0, model\.vocab_size=256\)"):
        trainer.train_step(batch)


def test_accumulation_matches_one_big_batch(tmp_path):
    whole = make(tmp_path / "a", ["trainer.max_steps=3"]).fit()
    split = make(tmp_path / "b", ["trainer.max_steps=3", "data.micro_batch_size=2"]).fit()
    for s in (1, 2, 3):
        assert split.losses[s] == pytest.approx(whole.losses[s], rel=1e-5)


def test_metrics_hold_the_contract_keys_and_expert_load(tmp_path):
    make(tmp_path, ["trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every=4"]).fit()
    import json

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = lines[0]
    for key in ("step", "loss", "lr", "tokens_per_s", "aux_loss", "dropped_fraction"):
        assert key in step
    load = step["expert_load"]
    assert len(load) == 4 and all(len(row) == 8 for row in load)  # tiny: 4 MoE layers x 8
    assert all(abs(sum(row) - 1.0) < 1e-3 for row in load)
    evals = [x for x in lines if "val_loss" in x]
    assert evals and evals[-1]["val_gap"] == pytest.approx(
        evals[-1]["val_loss"] - evals[-1]["floor"]
    )
    assert (tmp_path / "plots/expert_load_step4.png").exists()


def test_dropless_reports_zero_drops_and_capacity_reports_some(tmp_path):
    run = ["trainer.max_steps=2", "trainer.log_every=1"]
    make(tmp_path / "a", run).fit()
    make(tmp_path / "b", run + ["moe=capacity", "moe.capacity_factor=0.5"]).fit()
    import json

    def dropped(d):
        return json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])[
            "dropped_fraction"
        ]

    assert dropped("a") == 0.0
    assert dropped("b") >= 0.5 - 1e-6  # half the capacity: at least half the slots dropped


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))
)
def test_every_experiment_preset_runs_two_steps(tmp_path, preset):
    result = make(tmp_path, [f"experiment={preset}", "trainer.max_steps=2"]).fit()
    assert result.step == 2 and result.val_loss is not None and result.val_loss < 6.0


@pytest.mark.parametrize("preset", ["cpu", "anomaly"])
def test_debug_presets_run(tmp_path, preset):
    result = make(tmp_path, [f"debug={preset}", "trainer.max_steps=3"]).fit()
    assert result.step == 3 and result.skipped_steps == 0


def test_overfit_preset_memorises_one_batch(tmp_path):
    trainer = make(tmp_path, ["debug=overfit", "trainer.max_steps=150"])
    result = trainer.fit()
    assert result.losses[1] > 5.0
    assert result.losses[150] < 1.0  # far below the corpus floor (~1.1): memorised, not learned


def test_per_rank_state_from_a_larger_world(tmp_path):
    trainer = make(tmp_path, ["trainer.max_steps=2"])
    same = {"kind": "sequences", "epoch": 0, "step": 3}
    assert trainer._own([same, dict(same)], "data position") == same  # a world-free position
    with pytest.raises(UserError, match="differs between its 2 ranks .* with 2 processes, not 1"):
        trainer._own([same, {**same, "step": 4}], "data position")
