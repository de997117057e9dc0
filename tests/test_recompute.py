"""Activation recompute (trainer.recompute=experts|full) against none: bitwise the same losses,
gradients, weights and balancing state over 5 steps on the CPU, in one process (fp32 and bf16
autocast, every router, capacity with jitter, fine-tuning freezes, every other layer) and at
EP=2 (gloo, also under ZeRO-2); what each mode runs again in backward, what it keeps, and the
all-to-all traffic full recompute adds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from recompute_check import EP_CASES, MODES, Run, differences, pending_loads, train

from distributed import assert_all_ok, run_ranks

CASES = {
    "topk": [],
    "two_level": ["moe=two_level"],
    "group_limited": ["moe=group_limited"],
    "capacity_jitter": ["moe=capacity", "moe.jitter_eps=0.1"],
    "shared_expert": ["moe.num_shared_experts=1", "moe.shared_expert_gate=true"],
    "aux_free": ["moe=aux_free"],
    "bf16": ["trainer.precision=bf16"],
    "every_2nd_layer": ["trainer.recompute_layers=2"],
    "finetune_experts": ["finetune.train=experts"],
    "finetune_router": ["finetune.train=router+head"],
    "finetune_head": ["finetune.train=head"],
}
FREEZES = ("finetune_experts", "finetune_router", "finetune_head")


def expected_calls(calls: dict[str, int], micro_steps: int, mode: str, every: int = 1) -> dict:
    """How often each `layer.part` runs in one step's forward and backward: recomputed layers
    run their experts (experts) or the whole block (full) again in backward."""
    out = {}
    for key in calls:
        layer, part = key.split(".")
        on = mode != "none" and int(layer) % every == 0
        again = on and (mode == "full" or part != "attn")
        out[key] = micro_steps * (2 if again else 1)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train(overrides, mode), each run once per module, on one thread (the tiny model gains
    nothing from a second, which on a busy machine only waits for its turn)."""
    cache: dict[tuple[tuple[str, ...], str], Run] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(overrides: list[str], mode: str) -> Run:
        if mode == "none":  # which layers would recompute means nothing without recompute
            overrides = [x for x in overrides if not x.startswith("trainer.recompute_layers")]
        key = (tuple(overrides), mode)
        if key not in cache:
            cache[key] = train(overrides, mode, tmp_path_factory.mktemp(mode))
        return cache[key]

    yield get
    torch.set_num_threads(threads)


# ---- one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["experts", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_recompute_is_bitwise_the_same_training(run, case, mode):
    ref, got = run(CASES[case], "none"), run(CASES[case], mode)
    assert differences(ref, got) == []
    assert set(got.grads) == got.trainable  # every trained parameter has a gradient, no other
    if case in FREEZES:
        assert got.trainable < set(got.weights)


@pytest.mark.parametrize("case", ["topk", "shared_expert", "every_2nd_layer"])
def test_each_mode_runs_again_in_backward_what_it_drops(run, case):
    every = 2 if case == "every_2nd_layer" else 1
    runs = {mode: run(CASES[case], mode) for mode in MODES}
    for mode, r in runs.items():
        assert r.calls == expected_calls(r.calls, r.micro_steps, mode, every), mode
    if case == "shared_expert":
        assert "0.shared" in runs["none"].calls
    # What autograd keeps for backward outside the checkpoints: experts drop the experts'
    # hidden activations, full all but each block's input.
    assert runs["full"].saved_bytes < runs["experts"].saved_bytes < runs["none"].saved_bytes


def test_recompute_of_every_2nd_layer_keeps_more_than_of_every_layer(run):
    every, half = run(CASES["topk"], "full"), run(CASES["every_2nd_layer"], "full")
    assert every.saved_bytes < half.saved_bytes < run(CASES["topk"], "none").saved_bytes


def test_the_cases_exercise_what_they_name(run):
    """Equality above means something: jitter changes training, capacity drops slots, autocast
    computes in bf16, and the balancing biases move."""
    jitter = run(CASES["capacity_jitter"], "none").steps
    plain = run(["moe=capacity"], "none").steps
    assert jitter["loss"] != plain["loss"]
    assert all(d > 0 for d in jitter["dropped_fraction"])
    assert run(CASES["bf16"], "none").steps["loss"] != run(CASES["topk"], "none").steps["loss"]
    biases = {n: b for n, b in run(CASES["aux_free"], "full").buffers.items() if "expert_bias" in n}
    assert biases and all(b.abs().sum() > 0 for b in biases.values())


@pytest.mark.parametrize("mode", MODES)
def test_aux_free_load_is_tallied_once_per_routed_slot(run, mode):
    r = run(CASES["aux_free"], mode)
    assert pending_loads(r) == [r.tokens * r.top_k] * 4  # four MoE layers


# ---- EP=2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ep2(tmp_path_factory) -> list[dict]:
    """recompute_check.py on 2 ranks: every EP case under every mode, in one process group."""
    out = tmp_path_factory.mktemp("ep2")
    script = str(Path(__file__).parent / "recompute_check.py")
    results = run_ranks([script, str(out)], world=2, timeout=300)
    assert_all_ok(results)
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["experts", "full"])
@pytest.mark.parametrize("case", list(EP_CASES))
def test_ep2_recompute_is_bitwise_the_same_training(ep2, case, mode):
    assert sorted(r["rank"] for r in ep2) == [0, 1]
    for r in ep2:
        got = r["cases"][case][mode]
        assert got["differ"] == [], (r["rank"], got["differ"])
        assert got["grad_count"] > 0
        assert got["calls"] == expected_calls(got["calls"], got["micro_steps"], mode)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(EP_CASES))
def test_ep2_full_recompute_sends_the_rows_again(ep2, case):
    for r in ep2:
        runs = r["cases"][case]
        none, experts, full = (runs[m]["a2a"] for m in MODES)
        assert len(none) == 5 and all(s["a2a_rows"] > 0 for s in none)
        assert experts == none  # experts recompute after the dispatch: nothing sent again
        assert [s["a2a_rows"] for s in full] == [s["a2a_rows"] for s in none]
        assert [s["a2a_bytes"] for s in full] == [2 * s["a2a_bytes"] for s in none]


@pytest.mark.distributed
def test_ep2_aux_free_load_is_tallied_once_per_routed_slot(ep2):
    for r in ep2:
        for mode, got in r["cases"]["aux_free"].items():
            assert got["pending"] == [got["tokens"] * got["top_k"]] * 4, (r["rank"], mode)
