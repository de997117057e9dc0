"""`python -m xpar.hf upcycle|export|import`: move models between xpar and Hugging Face.

  upcycle HF_DENSE_DIR OUT_DIR moe.num_experts=8 moe.top_k=2 [moe.KEY=V ...]
          [model.first_k_dense=N] [model.moe_every=N] [--noise STD] [--seed N]
      a local Llama/Mistral checkpoint as an xpar MoE model dir equal to it at init
  export XPAR_MODEL OUT_DIR
      a model dir, checkpoint, checkpoints dir or run dir as an HF checkpoint
  import HF_MOE_DIR OUT_DIR
      a local Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3 checkpoint as an
      xpar model dir

Continue training from a model dir with `python -m xpar.train trainer.init_from=OUT_DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xpar.checks import UserError, report_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xpar.hf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upcycle", help="dense Llama/Mistral -> xpar MoE model dir")
    up.add_argument("src", type=Path, help="local HF dense checkpoint dir")
    up.add_argument("out", type=Path, help="new (or empty) model dir")
    up.add_argument("overrides", nargs="*", help="moe.KEY=VALUE, model.first_k_dense=N, ...")
    up.add_argument("--noise", type=float, default=0.0, help="expert noise, x each weight's std")
    up.add_argument("--seed", type=int, default=0, help="seed of the routers and the noise")
    ex = sub.add_parser("export", help="xpar model -> HF checkpoint dir")
    ex.add_argument("src", type=Path, help="model dir, checkpoint, checkpoints dir or run dir")
    ex.add_argument("out", type=Path, help="new (or empty) HF checkpoint dir")
    im = sub.add_parser("import", help="HF MoE checkpoint -> xpar model dir")
    im.add_argument("src", type=Path, help="local Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE dir")
    im.add_argument("out", type=Path, help="new (or empty) model dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "upcycle":
            from xpar.hf.upcycle import upcycle

            out, cfg = upcycle(args.src, args.out, args.overrides, args.noise, args.seed)
            moe = cfg.moe
            print(
                f"wrote {out} (xpar model dir: {moe.num_experts} experts, top-{moe.top_k}, "
                f"MoE layers {cfg.moe_layer_ids()}); train on with "
                f"`python -m xpar.train trainer.init_from={out}`"
            )
        elif args.command == "export":
            from xpar.hf.export import export_hf

            done = export_hf(args.src, args.out)
            for note in done.notes:
                print(f"note: {note}")
            print(f"wrote {done.path} ({done.architecture}, config.json + model.safetensors)")
        else:
            from xpar.hf.importer import import_hf

            out, cfg, model_type = import_hf(args.src, args.out)
            print(f"wrote {out} (xpar model dir from {model_type}, {cfg.n_layers} layers)")
    except UserError as e:
        return report_error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
