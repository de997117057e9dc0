"""Hugging Face interop: upcycle a dense Llama/Mistral checkpoint into an xpar MoE model,
import Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints, and export xpar models in the
family that expresses them exactly. The command line is `python -m xpar.hf`."""

from xpar.hf.export import export_hf
from xpar.hf.importer import import_hf
from xpar.hf.upcycle import upcycle

__all__ = ["export_hf", "import_hf", "upcycle"]
