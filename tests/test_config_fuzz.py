"""The config surface under generated command lines: every override `python -m xpar.train`
could be given (any group option, any key of any section, typos of both, values of the right
type, of the wrong type and junk, spelled `key=`, `+key=`, `++key=` or `~key`) either composes
into a checked TrainConfig or is refused with one UserError line, which the CLI prints as its
one `xpar: error:` line with exit code 2 (tests/test_train_cli.py runs that path). Anything
else escaping is a traceback a user would see: the test fails.

This is the whole check the CLI makes before Hydra starts a job (xpar.compose.compose_checked,
then checked_job); what the trainer refuses later (data, checkpoints) is tested beside it."""

from __future__ import annotations

import dataclasses
import string
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpar.checks import UserError
from xpar.compose import checked_job, compose_checked
from xpar.config import CONF_DIR, TrainConfig, register_configs
from xpar.data.config import HFLabelsDataConfig, HFTextDataConfig, SyntheticDataConfig

GROUPS = {
    p.name: sorted(f.stem for f in p.glob("*.yaml"))
    for p in Path(CONF_DIR).iterdir()
    if p.is_dir() and p.name not in ("hydra", "task_data", "__pycache__")
}
GROUPS["model"] = ["tiny", "moe_300m", "mixtral_8x7b", "deepseek_v3"]
SECTIONS = {"data": [SyntheticDataConfig, HFTextDataConfig, HFLabelsDataConfig]}


def schema_keys() -> dict[str, typing.Any]:
    """Every scalar or list key of the job (`section.field` or deeper) and its type."""
    keys: dict[str, typing.Any] = {}

    def walk(prefix: str, schema: type) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            hint = hints[f.name]
            inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
            if dataclasses.is_dataclass(hint) or inner:
                walk(f"{prefix}{f.name}.", inner[0] if inner else hint)
            else:
                keys[f"{prefix}{f.name}"] = hint

    for f in dataclasses.fields(TrainConfig):
        for schema in SECTIONS.get(f.name, []):
            walk(f"{f.name}.", schema)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            continue
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint) or inner:
            walk(f"{f.name}.", inner[0] if inner else hint)
        else:
            keys[f.name] = hint
    return keys


KEYS = schema_keys()
JUNK = st.text(
    alphabet=string.ascii_letters + string.digits + "._-/:~!@#$%^&*()[]{}<>,;'\" =+?",
    max_size=10,
)


def values_for(hint: typing.Any) -> st.SearchStrategy[str]:
    """Values of the key's own type (in range or not), of other types, and junk."""
    typed = {
        int: st.integers(-3, 10**6).map(str),
        float: st.floats(-1e3, 1e3, allow_nan=False).map(repr) | st.sampled_from(["nan", "inf"]),
        bool: st.sampled_from(["true", "false", "yes", "0"]),
        str: st.text(string.ascii_lowercase + "_", max_size=8),
    }
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    own = [typed[a] for a in args if a in typed]
    if typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in args):
        own.append(
            st.lists(st.text(string.ascii_lowercase, max_size=4), max_size=3).map(
                lambda xs: "[" + ",".join(xs) + "]"
            )
        )
    other = st.sampled_from(
        ["null", "abc", "-1", "0", "2.5", "[1,2]", "{a: 1}", "${model.d_model}"]
    )
    return st.one_of(*own, other, JUNK)


def typo(key: str) -> st.SearchStrategy[str]:
    """`key` with one character dropped, doubled or swapped for another."""
    return st.integers(0, len(key) - 1).flatmap(
        lambda i: st.sampled_from(
            [key[:i] + key[i + 1 :], key[:i] + key[i] + key[i:], key[:i] + "z" + key[i + 1 :]]
        )
    )


@st.composite
def override(draw) -> str:
    kind = draw(st.sampled_from(["group", "key", "key", "key", "typo"]))
    if kind == "group":
        group = draw(st.sampled_from(sorted(GROUPS)))
        option = draw(st.sampled_from(GROUPS[group]) | JUNK)
        return f"{group}={option}"
    key = draw(st.sampled_from(sorted(KEYS)))
    value = draw(values_for(KEYS[key]))
    if kind == "typo":
        key = draw(typo(key))
    prefix = draw(st.sampled_from(["", "", "", "+", "++", "~"]))
    return f"~{key}" if prefix == "~" else f"{prefix}{key}={value}"


def check_up_front(overrides: list[str]) -> TrainConfig | None:
    """What the CLI does with `overrides` before Hydra starts the job."""
    composed = compose_checked(overrides)
    return None if composed is None else checked_job(composed, overrides)


@settings(
    max_examples=150,  # of 2 or 3 overrides each: at least 300 overrides
    deadline=None,
    derandomize=True,  # the same command lines on every run: CI does not fail at random
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(override(), min_size=2, max_size=3))
def test_every_override_composes_or_is_one_line(tmp_path_factory, overrides):
    register_configs()
    try:
        cfg = check_up_front([*overrides, "trainer.device=cpu"])
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message, (overrides, message)
        return
    assert isinstance(cfg, TrainConfig), overrides


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+moe.topk=1", "+trainer.max_stepz=1"], "unknown key moe.topk (did you mean moe.top_k?)"),
        (
            ["++trainer.max_stepz=1"],
            "unknown key trainer.max_stepz (did you mean trainer.max_steps?)",
        ),
        (["moe.topk=2"], "unknown key moe.topk (did you mean moe.top_k?)"),
        (["+foo=1"], "unknown key foo (the config has data, deepspeed,"),
        (["moe.top_k=abc"], "moe.top_k=abc: moe.top_k takes an int"),
        (["moe.top_k=2.5"], "moe.top_k=2.5: moe.top_k takes an int"),
        (["moe.capacity_factor=x"], "moe.capacity_factor takes a float or null"),
        (["trainer.progress=maybe"], "trainer.progress takes a bool (true or false)"),
        (["run_name=../../escape"], "run_name='../../escape' must be a plain name"),
        (["run_name=a/b"], "run_name='a/b' must be a plain name"),
        (["run_name=.."], "run_name='..' must be a plain name"),
    ],
)
def test_unknown_keys_bad_types_and_paths_in_run_name_are_named(overrides, message):
    """Hydra's `+key=value` used to add an unknown key silently (the run went on with
    moe.top_k=2), a bad type said only "Error merging override", and run_name=../../x wrote the
    run outside runs/."""
    register_configs()
    with pytest.raises(UserError) as info:
        check_up_front(overrides)
    assert message in str(info.value), str(info.value)
