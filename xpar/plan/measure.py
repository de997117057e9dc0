"""Activation memory measured: the bytes autograd holds for backward after one training forward
pass of a real model, per block, found with saved-tensor hooks. It runs wherever the model is (a
CPU will do) and is the ground truth `xpar.plan.activations` is checked against.

A tensor autograd saves is charged by its storage, once (views and repeated saves of one
tensor share it), to the block running when it is first saved. Parameters and buffers are left
out (they are not activations); copies of them (autocast's bf16 weights) count. Inside a
non-reentrant checkpoint torch's own hooks take over, so a recomputed region is charged what
the checkpoint keeps outside it: its inputs.

Legend: B batch, L sequence length + 1 (an LM row: inputs then the last target).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from xpar.model import MoETransformerLM
from xpar.plan.activations import ActivationBytes


def _key(t: Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


class _Tally:
    """Storages saved for backward, each charged to where the forward pass was (a block's
    index, or None: outside the blocks) when it was first saved."""

    def __init__(self, num_layers: int, excluded: set[tuple[torch.device, int]]) -> None:
        self.excluded = excluded
        self.seen: set[tuple[torch.device, int]] = set()
        self.where: int | None = None
        self.per_layer = [0] * num_layers
        self.outside = 0

    def enter(self, where: int | None) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self.where = where

        return hook

    def pack(self, t: Tensor) -> Tensor:
        nbytes, key = t.untyped_storage().nbytes(), _key(t)
        if nbytes and key not in self.excluded and key not in self.seen:
            self.seen.add(key)  # the graph keeps t alive, so no later storage reuses its address
            if self.where is None:
                self.outside += nbytes
            else:
                self.per_layer[self.where] += nbytes
        return t


@contextmanager
def _unchanged(model: MoETransformerLM, device: torch.device) -> Iterator[None]:
    """Puts back what a training forward pass changes: the train/eval mode, the buffers (the
    routers' load tally) and the RNG (router jitter draws from it)."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = [device] if device.type != "cpu" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def measure_activations(
    model: MoETransformerLM, tokens_BL: Tensor, autocast_dtype: torch.dtype | None = None
) -> ActivationBytes:
    """Bytes held for backward by one training forward pass and loss on rows `tokens_BL`
    (inputs tokens_BL[:, :-1], targets tokens_BL[:, 1:], as the LM runner feeds them), under
    autocast to `autocast_dtype` when given. The graph is dropped unused (no gradients are
    made) and the model is left as it was."""
    state = [*model.parameters(), *model.buffers()]
    tally = _Tally(len(model.layers), {_key(t) for t in state})
    hooks = [b.register_forward_pre_hook(tally.enter(i)) for i, b in enumerate(model.layers)]
    hooks.append(model.norm.register_forward_pre_hook(tally.enter(None)))
    device = tokens_BL.device
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    try:
        with _unchanged(model, device), autocast, torch.enable_grad():
            model.train()
            with torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda t: t):
                out = model(tokens_BL[:, :-1], targets_BS=tokens_BL[:, 1:])
            del out  # the graph and every saved tensor with it
    finally:
        for hook in hooks:
            hook.remove()
    return ActivationBytes(per_layer=tally.per_layer, outside=tally.outside)
