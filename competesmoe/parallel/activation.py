"""Activation checkpointing and compiled blocks, applied to a built model from outside.

Both leave the model's modules and parameter names as they are (a checkpoint written with them
loads without them, and the Hugging Face export sees the same tensors): checkpointing replaces
the `forward` of the chosen modules on the instance, compiling uses `nn.Module.compile`, which
compiles the module's call in place.

parallel.activation_checkpoint chooses what a checkpointed block stores for backward:

  none   everything (no recompute)
  full   only the block's input: attention and the MoE layer are recomputed in backward
  ffn    everything but the MoE/FFN sublayer's internals (the router, dispatch, the experts'
         hidden activations), which are recomputed: the largest share of an MoE block
  attn   everything but attention's internals (q, k, v, the attention output)

on every parallel.activation_checkpoint_every-th block (blocks 0, k, 2k, ...). Recompute runs the
same code on the same inputs with the RNG state of the first forward (non-reentrant
torch.utils.checkpoint), so the routing, the competition's winners and every statistic equal the
first pass; only the first pass's statistics are kept. A competing layer's all-expert pass keeps
its own recompute (TorchBackend.scores checkpoints it in chunks, the Triton kernel recomputes in
its backward): under `full` or `ffn` it nests inside the block's checkpoint and keeps only the
scores [T, E] either way. Under expert parallelism the recompute repeats the layer's all-to-alls
in backward, in the same order on every rank (every rank checkpoints the same blocks).
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from competesmoe.parallel.config import ParallelConfig


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return run


def _checkpoint_module(module: nn.Module) -> None:
    module.forward = _checkpointed(module.forward)


def checkpointed_modules(model: nn.Module, parallel: ParallelConfig) -> list[nn.Module]:
    """The modules whose forward is recomputed in backward, in block order."""
    if parallel.activation_checkpoint == "none":
        return []
    chosen = []
    for i, block in enumerate(model.blocks):
        if i % parallel.activation_checkpoint_every:
            continue
        chosen.append({"full": block, "ffn": block.ffn, "attn": block.attn}[parallel.activation_checkpoint])
    return chosen


def apply_activation_checkpointing(model: nn.Module, parallel: ParallelConfig) -> None:
    for module in checkpointed_modules(model, parallel):
        _checkpoint_module(module)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each transformer block. The MoE layer breaks the graph where its shapes
    depend on the routing: the per-expert row counts become host integers (grouped_matmul's
    padding, the all-to-all split sizes under expert parallelism), and in fp32/fp16 the grouped
    matmul itself runs eagerly (experts.py: `_eager_grouped_mm`), so dynamo compiles the dense
    parts around them (attention, norms, the router's logits, the combine) and runs the rest
    eagerly."""
    for block in model.blocks:
        block.compile()
