"""A job's config from the command line, before Hydra runs it: the up-front check of the
overrides (one line instead of Hydra's report), and a run taking its architecture from the
artefact it resumes or starts from."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from xpar.checks import UserError
from xpar.config import CONF_DIR, TrainConfig, schema_error, to_train_config


def compose_checked(overrides: list[str]) -> DictConfig | None:
    """Compose once up front so an unknown group option, key or badly typed value is reported
    in one line instead of Hydra's multi-line report; returns the composed config (with its
    hydra node). Sweeps (-m) and Hydra's own flags go straight to Hydra (None)."""
    if any(arg.startswith("-") for arg in overrides):
        return None
    try:
        return _compose(overrides)
    except AssertionError as e:  # OmegaConf's, for a key set inside a null section
        raise UserError(null_section_error(overrides)) from e
    except MissingConfigException as e:
        options = sorted(o for o in (e.options or []) if not o.startswith("schema"))
        raise UserError(f"{str(e).splitlines()[0]}; valid options: {', '.join(options)}") from e
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise UserError(override_error(e)) from e


def _compose(overrides: list[str]) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def null_section_error(overrides: list[str]) -> str:
    """The first override that sets a key inside a section this job leaves null (model.mla of
    a model without latent attention, moe of a dense model), found by composing one more
    override at a time."""
    for i, override in enumerate(overrides):
        try:
            _compose(overrides[: i + 1])
        except AssertionError:
            key = override.split("=", 1)[0].lstrip("+~")
            section = key.rpartition(".")[0]
            return (
                f"{override}: {section} is null in this job, so {key} cannot be set (pick a "
                f"model or option that has {section}, or set {section} whole)"
            )
        except (HydraException, OmegaConfBaseException, ValueError):
            continue
    return f"the overrides {overrides} set a key inside a section that is null in this job"


def override_error(e: Exception) -> str:
    """Hydra's report on an override as one line. A bad value or unknown key is described by
    the schema (the field's type and the value given; the nearest valid key), not by Hydra's
    `Error merging override` or its hint to add the key with `+`."""
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return schema_error(cause)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[:2]) or type(e).__name__


def checked_job(composed: DictConfig, overrides: list[str]) -> TrainConfig:
    """The TrainConfig of a composed job (the hydra node dropped, the architecture adopted),
    built and checked before Hydra starts the job, so that a refused job creates nothing."""
    HydraConfig.instance().set_config(composed)
    job = copy.deepcopy(composed)
    with open_dict(job):
        del job["hydra"]
    adopt_architecture(job, overrides)
    return to_train_config(job)


def adopt_architecture(job: DictConfig, overrides: list[str]) -> None:
    """`trainer.resume=PATH` and `trainer.init_from=PATH` make the run take PATH's
    architecture (the `model` and `moe` sections, which every artefact holds), so that
    resuming a checkpoint from anywhere, or fine-tuning an upcycled, imported or earlier model,
    needs no model flags. The command line's own `model.KEY=`/`moe.KEY=` values, and those of
    a `moe=NAME` option, still win (routing knobs such as moe.capacity_factor may change;
    shapes must match), and `model=NAME` turns it off. A resume path that holds no artefact is
    left to the trainer, which says what it found there."""
    from xpar.persist import read_model_info  # torch-heavy; after parsing

    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "model" in keys:
        return
    resume = OmegaConf.select(job, "trainer.resume")
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        try:
            arch_of = read_model_info(resume)[0]
        except UserError:
            return
    elif path := OmegaConf.select(job, "trainer.init_from"):
        arch_of = read_model_info(path)[0]
    else:
        return
    for option in [o.split("=", 1)[1] for o in overrides if o.startswith("moe=")]:
        keys |= {f"moe.{k}" for k in OmegaConf.load(Path(CONF_DIR) / "moe" / f"{option}.yaml")}
    arch = dataclasses.asdict(arch_of)
    moe = arch.pop("moe")
    # merge_with, not assignment: OmegaConf 2.3 refuses a dict assigned over a None dataclass
    # node (model.mla, moe).
    with open_dict(job):
        job.model.merge_with({k: v for k, v in arch.items() if f"model.{k}" not in keys})
        if moe is None:
            job.moe = None
        else:
            # moe.d_model stays conf/config.yaml's ${model.d_model}.
            kept = {k: v for k, v in moe.items() if f"moe.{k}" not in keys and k != "d_model"}
            job.merge_with({"moe": kept})
