"""A job's config from the command line, before Hydra runs it: the up-front check of the
overrides (one line instead of Hydra's report), and a run taking its architecture from the
artefact it resumes or starts from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from xpar.checks import UserError
from xpar.config import CONF_DIR


def compose_checked(overrides: list[str]) -> DictConfig | None:
    """Compose once up front so an unknown group option, key or badly typed value is reported
    in one line instead of Hydra's multi-line report; returns the composed config (with its
    hydra node). Sweeps (-m) and Hydra's own flags go straight to Hydra (None)."""
    if any(arg.startswith("-") for arg in overrides):
        return None
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        options = sorted(o for o in (e.options or []) if not o.startswith("schema"))
        raise UserError(f"{str(e).splitlines()[0]}; valid options: {', '.join(options)}") from e
    except (HydraException, OmegaConfBaseException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError("; ".join(lines[:2])) from e
    finally:
        GlobalHydra.instance().clear()


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
