"""Triton kernels for the experts (installed as competesmoe.kernels).

  TritonBackend      the expert backend (see competesmoe.model.moe.experts.TorchBackend for the
                     semantics): a grouped dropless MLP for the sparse path (grouped_mlp.py) and
                     fused all-expert competition scores (competition.py)
  triton_usable(d)   whether the kernels can run on device d

Nothing here imports Triton until it is needed, so a broken or missing Triton only makes
triton_usable() return False. Under TRITON_INTERPRET=1 (set before this package's kernels are
first imported) the kernels run on CPU tensors in the interpreter: fp32 and fp16 only.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


def triton_usable(device: torch.device) -> bool:
    """True on a CUDA device of compute capability >= 8.0 when Triton imports; on CPU only when the
    kernels were loaded under TRITON_INTERPRET=1. Never raises."""
    try:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            return False
        if device.type not in ("cpu", "cuda"):
            return False
        from . import configs  # imports triton

        if configs.INTERPRET:
            return os.environ.get("TRITON_INTERPRET") == "1"
        return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    except Exception:
        return False


def _compute_dtype(x: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
    """Cast to the dtype the matmuls run in: autocast's when it is on (as torch's own matmuls
    would), else x's. The casts are autograd ops, so fp32 master weights get fp32 grads."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) for t in (x, *weights))


class TritonBackend:
    """Expert backend on the Triton kernels. `scores` returns fp32; `mlp` returns the compute dtype."""

    name = "triton"

    def __init__(self):
        from .competition import competition_scores
        from .grouped_mlp import grouped_mlp

        self._scores, self._mlp = competition_scores, grouped_mlp

    def mlp(self, x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
        x, w1, w2 = _compute_dtype(x, w1, w2)
        return self._mlp(x, offsets.to(torch.int32), w1, w2, activation)

    def scores(self, x: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
        x, w1, w2 = _compute_dtype(x, w1, w2)
        return self._scores(x, w1, w2, activation)


__all__ = ["TritonBackend", "triton_usable"]
