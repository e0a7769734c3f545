"""Expert weights, stacked by global expert id, and the backends that run them.

Expert i is `E_i(x) = act(x W1_i) W2_i` without bias. The weights are two tensors,
`w1: [E, d, h]` (`[E, d, 2h]` for swiglu: gate then up) and `w2: [E, h, d]`, so expert
parallelism slices dim 0 and checkpoints store them whole by expert id.

A backend does the two expert computations the MoE layer needs:
  mlp(x_sorted, offsets, w1, w2, act)  tokens grouped by expert -> their outputs (sparse path)
  scores(x, w1, w2, act)               all experts on all tokens -> s [T, E], the neural responses
                                       s_e(x) = mean_c softplus(E_e(x)_c) (competition path)
`offsets` holds int32 cumulative group ends (offsets[e] = rows of experts 0..e), as in
torch.nn.functional.grouped_mm.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from competesmoe.errors import ConfigError
from competesmoe.kernels.spec import expert_flops_per_token, w1_columns  # noqa: F401 (re-exported)
from competesmoe.model.init import Stream, global_stream, normal_


def activate(h: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation '{activation}'")


class Experts(nn.Module):
    """E two-layer MLPs held as stacked tensors. `first_expert` is the global id of row 0, so a
    shard under expert parallelism knows which experts it holds."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str,
                 out_init_std: float, first_expert: int = 0):
        super().__init__()
        self.num_experts, self.d_model, self.hidden, self.activation = num_experts, d_model, hidden, activation
        self.first_expert, self.out_init_std = first_expert, out_init_std
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, w1_columns(hidden, activation)))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.init_parameters(global_stream)

    def init_parameters(self, stream: Stream) -> None:
        """Expert by expert, each from the stream of its global id (the same whatever the shard);
        from torch's global generator, one draw per tensor."""
        if stream("w1") is None:
            normal_(self.w1, self.d_model ** -0.5, None)
            normal_(self.w2, self.out_init_std, None)
            return
        for j in range(self.num_experts):
            normal_(self.w1[j], self.d_model ** -0.5, stream("w1", self.first_expert + j))
            normal_(self.w2[j], self.out_init_std, stream("w2", self.first_expert + j))

    def shard(self, start: int, end: int) -> None:
        """Keep only global experts [start, end) (expert parallelism). On the meta device this
        costs nothing, which is how a rank builds only its own experts (model/init.py)."""
        if (start, end) == (self.first_expert, self.first_expert + self.num_experts):
            return
        self.w1 = nn.Parameter(self.w1.detach()[start - self.first_expert:end - self.first_expert].clone())
        self.w2 = nn.Parameter(self.w2.detach()[start - self.first_expert:end - self.first_expert].clone())
        self.num_experts, self.first_expert = end - start, start

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} (global ids {self.first_expert}.."
                f"{self.first_expert + self.num_experts - 1}), d={self.d_model}, h={self.hidden}, "
                f"act={self.activation}")


class ExpertBackend(Protocol):
    name: str

    def mlp(self, x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor: ...

    def scores(self, x: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor: ...


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """torch's grouped_mm takes fp32/fp16/bf16 with 16-byte aligned rows on CPU, bf16 on CUDA."""
    if x.device.type == "cuda":
        return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(x.device)[0] >= 9)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and w.shape[-1] % align == 0


def _padded_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """The same product for any dtype: scatter the groups into [E, max_rows, k] and bmm."""
    num_groups = w.shape[0]
    ends = offsets.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    if x.shape[0] == 0:
        # stay in the autograd graph: under expert parallelism a rank that receives no tokens
        # must still take part in the backward's collectives
        return x @ w[0]
    group = torch.repeat_interleave(torch.arange(num_groups, device=x.device), counts, output_size=x.shape[0])
    row = torch.arange(x.shape[0], device=x.device) - (ends - counts)[group]
    max_rows = int(counts.max())
    padded = x.new_zeros(num_groups, max_rows, x.shape[-1]).index_put((group, row), x)
    return torch.bmm(padded, w)[group, row]


@torch.compiler.disable
def _eager_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    # torch's fake-tensor kernel of grouped_mm (what torch.compile traces with) accepts only bf16,
    # CUDA's rule, while the CPU kernel also takes fp32/fp16: in those dtypes the call cannot be
    # traced, so it runs eagerly (a graph break in a compiled block).
    return F.grouped_mm(x, w, offs=offsets)


def grouped_matmul(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """out[rows of group e] = x[rows of group e] @ w[e]; rows are grouped by `offsets`."""
    if grouped_mm_supported(x, w):
        if x.dtype != torch.bfloat16:
            return _eager_grouped_mm(x, w, offsets)
        return F.grouped_mm(x, w, offs=offsets)
    return _padded_grouped_mm(x, w, offsets)


def _scores_of_experts(x: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
    hidden = activate(torch.einsum("td,edh->eth", x, w1), activation)
    return F.softplus(torch.bmm(hidden, w2)).mean(-1).t()


class TorchBackend:
    """Pure-torch experts: grouped_mm (or a padded bmm where grouped_mm cannot run) for the sparse
    path; for the competition, experts in chunks under activation checkpointing so that only the
    scores [T, E] are kept for backward and the E x T x d outputs are recomputed there."""

    name = "torch"

    def __init__(self, score_chunk_bytes: int = 256 * 2**20):
        self.score_chunk_bytes = score_chunk_bytes

    def mlp(self, x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
        return grouped_matmul(activate(grouped_matmul(x, w1, offsets), activation), w2, offsets)

    def scores(self, x: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
        num_experts = w1.shape[0]
        per_expert = x.shape[0] * (w1.shape[-1] + w2.shape[-1]) * x.element_size()
        chunk = max(1, min(num_experts, self.score_chunk_bytes // max(per_expert, 1)))
        parts = [
            checkpoint(_scores_of_experts, x, w1[i:i + chunk], w2[i:i + chunk], activation, use_reentrant=False)
            for i in range(0, num_experts, chunk)
        ]
        return torch.cat(parts, dim=1)


def check_backend(name: str, device: torch.device) -> None:
    """Refuse, before any work, a backend that cannot run on `device`."""
    if name == "triton":
        from competesmoe.kernels import triton_usable

        if not triton_usable(device):
            raise ConfigError(f"model.moe.backend=triton cannot run on {device}: the Triton kernels need a "
                              "CUDA GPU of compute capability >= 8.0 (on a CPU only under TRITON_INTERPRET=1, "
                              "for testing); use backend=auto or torch")


def resolve_backend(name: str, device: torch.device) -> ExpertBackend:
    """`auto` = our Triton kernels on a CUDA device, pure torch elsewhere."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend()
    if name in ("auto", "triton"):
        from competesmoe.kernels import TritonBackend, triton_usable

        if triton_usable(device):
            return TritonBackend()
        if name == "triton":
            raise RuntimeError(f"expert backend 'triton' cannot run on {device}: Triton needs a CUDA "
                               "device (or TRITON_INTERPRET=1 for CPU testing)")
        return TorchBackend()
    raise ValueError(f"unknown expert backend '{name}'")


def init_std_out(fan_in: int, n_layers: int) -> float:
    """Init of output projections: fan-in scaled, shrunk with depth as in GPT-2 style residual init."""
    return fan_in ** -0.5 * math.sqrt(2.0 / n_layers)
