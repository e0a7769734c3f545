"""Dropless grouped (ragged) expert MLP for the sparse path: rows sorted by expert, group ends in
int32 `offsets` (empty groups allowed), y[rows of e] = act(x[rows] @ W1[e]) @ W2[e].

Two persistent Triton kernels do all of it:
  _grouped_rows_kernel   out[rows of e] = A'[rows] @ B[e]        (row tiles of one expert each)
  _grouped_wgrad_kernel  out[e] = A'[rows of e]^T @ B[rows of e] (reduction over the group's rows)
A' is A or act(A) applied while loading (so only the pre-activations are kept for backward), and
the row kernel can write dL/dpre = out * act'(pre) instead of out.

Forward:  pre = x @ W1[e];  y = act(pre) @ W2[e]
Backward: dpre = (dy @ W2[e]^T) * act'(pre);  dx = dpre @ W1[e]^T;
          dW2[e] = act(pre)^T @ dy;  dW1[e] = x^T @ dpre
The row tiles are scheduled inside the kernel from `offsets` (a prefix sum of per-expert tile
counts), so there is no host sync and an empty expert gets no tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .activations import check_expert_inputs, load_hidden, store_pre_grad
from .configs import GROUPED_ROWS, GROUPED_WGRAD, dot_precision, persistent_programs


@triton.jit
def _row_tile_schedule(offsets_ptr, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per expert (padded to E_POW2): first row, end row, first and end tile ids; and the tile count."""
    experts = tl.arange(0, E_POW2)
    valid = experts < E
    ends = tl.load(offsets_ptr + experts, mask=valid, other=0)
    starts = tl.load(offsets_ptr + experts - 1, mask=valid & (experts > 0), other=0)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    tile_ends = tl.cumsum(tiles, 0)
    return starts, ends, tile_ends - tiles, tile_ends, tl.sum(tiles, 0)


@triton.autotune(configs=GROUPED_ROWS.configs, key=["K", "N", "A_ACT", "OUT_DACT"],
                 prune_configs_by={"early_config_prune": GROUPED_ROWS.prune})
@triton.jit
def _grouped_rows_kernel(a_ptr, b_ptr, out_ptr, pre_ptr, offsets_ptr, E, K, N,
                         stride_am, stride_be, stride_bk, stride_bn, stride_om,
                         A_ACT: tl.constexpr, OUT_DACT: tl.constexpr, E_POW2: tl.constexpr,
                         DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows of e] = A'[rows of e] @ B[e], B[e] being [K, N] (any strides).

    A_ACT != "none": A holds pre-activations and A' = act(A) has K hidden units.
    OUT_DACT != "none": `out` receives dL/dpre = result * act'(pre) for N hidden units (pre and
    out share a layout; with swiglu both have 2N columns)."""
    starts, ends, first_tiles, end_tiles, m_tiles = _row_tile_schedule(offsets_ptr, E, E_POW2, BLOCK_M)
    experts = tl.arange(0, E_POW2)
    n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), m_tiles * n_tiles, tl.num_programs(0)):
        # n fastest: neighbouring programs share the A rows and expert e's weights in L2
        m_tile = tile // n_tiles
        e = tl.sum((end_tiles <= m_tile).to(tl.int32), 0)
        own = experts == e
        row_end = tl.sum(tl.where(own, ends, 0), 0)
        row_start = tl.sum(tl.where(own, starts + (m_tile - first_tiles) * BLOCK_M, 0), 0)
        rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < row_end
        cols = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        b_e = b_ptr + e.to(tl.int64) * stride_be

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a_offs = rows[:, None] * stride_am + ks[None, :]
            a_mask = row_mask[:, None] & (ks < K)[None, :]
            if A_ACT == "none":
                a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
            else:
                a = load_hidden(a_ptr, a_offs, a_mask, K, A_ACT).to(b_ptr.dtype.element_ty)
            b = tl.load(b_e + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=(ks < K)[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        out_offs = rows[:, None] * stride_om + cols[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        if OUT_DACT == "none":
            tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            store_pre_grad(out_ptr, pre_ptr, out_offs, out_mask, N, acc, OUT_DACT)


@triton.autotune(configs=GROUPED_WGRAD.configs, key=["M", "N", "A_ACT"],
                 prune_configs_by={"early_config_prune": GROUPED_WGRAD.prune})
@triton.jit
def _grouped_wgrad_kernel(a_ptr, b_ptr, out_ptr, offsets_ptr, E, M, N, stride_am, stride_bm,
                          A_ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = A'[rows of e]^T @ B[rows of e], out contiguous [E, M, N]; zero for an empty group.
    A_ACT != "none": A holds pre-activations and A' = act(A) has M hidden units."""
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), E * m_tiles * n_tiles, tl.num_programs(0)):
        e = tile // (m_tiles * n_tiles)
        ms = ((tile // n_tiles) % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        ns = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = ms < M
        n_mask = ns < N
        row_start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
        row_end = tl.load(offsets_ptr + e)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_K):
            rs = (r0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            r_mask = rs < row_end
            a_offs = rs[:, None] * stride_am + ms[None, :]
            a_mask = r_mask[:, None] & m_mask[None, :]
            if A_ACT == "none":
                a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
            else:
                a = load_hidden(a_ptr, a_offs, a_mask, M, A_ACT).to(b_ptr.dtype.element_ty)
            b = tl.load(b_ptr + rs[:, None] * stride_bm + ns[None, :], mask=r_mask[:, None] & n_mask[None, :],
                        other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)

        out_offs = e.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _launch_rows(a: Tensor, b: Tensor, offsets: Tensor, out: Tensor, a_act: str = "none",
                 out_dact: str = "none", pre: Tensor | None = None) -> None:
    """out = A' @ B[e] per row group; `b` is [E, K, N] with any strides (pass transposed views)."""
    num_experts, k, n = b.shape
    programs = persistent_programs(a.device)
    def grid(meta):
        return (min(programs, (triton.cdiv(a.shape[0], meta["BLOCK_M"]) + num_experts)
                    * triton.cdiv(n, meta["BLOCK_N"])),)

    # `pre` is only read under OUT_DACT; any pointer of the right dtype fills the slot otherwise.
    _grouped_rows_kernel[grid](
        a, b, out, out if pre is None else pre, offsets, num_experts, k, n,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        A_ACT=a_act, OUT_DACT=out_dact, E_POW2=triton.next_power_of_2(num_experts),
        DOT_PRECISION=dot_precision(a.dtype))


def _launch_wgrad(a: Tensor, b: Tensor, offsets: Tensor, out: Tensor, a_act: str = "none") -> None:
    """out[e] = A'[rows of e]^T @ b[rows of e] into a contiguous [E, M, N]."""
    num_experts, m, n = out.shape
    programs = persistent_programs(a.device)
    def grid(meta):
        return (min(programs, num_experts * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    _grouped_wgrad_kernel[grid](a, b, out, offsets, num_experts, m, n, a.stride(0), b.stride(0),
                                A_ACT=a_act, DOT_PRECISION=dot_precision(a.dtype))


def grouped_mlp_forward(x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str,
                        pre: Tensor, y: Tensor) -> None:
    """Fills pre [N, W1 columns] (kept for backward) and y [N, d]. Inputs contiguous, one dtype."""
    _launch_rows(x, w1, offsets, pre)
    _launch_rows(pre, w2, offsets, y, a_act=activation)


def grouped_mlp_backward(dy: Tensor, x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str,
                         pre: Tensor, dpre: Tensor, dx: Tensor, dw1: Tensor, dw2: Tensor) -> None:
    """Fills dpre (like pre), dx, dw1, dw2 from dy and the forward's pre."""
    _launch_rows(dy, w2.transpose(1, 2), offsets, dpre, out_dact=activation, pre=pre)
    _launch_rows(dpre, w1.transpose(1, 2), offsets, dx)
    _launch_wgrad(pre, dy, offsets, dw2, a_act=activation)
    _launch_wgrad(x, dpre, offsets, dw1)


def _check_inputs(x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str) -> None:
    check_expert_inputs(x, w1, w2, activation)
    if offsets.dtype != torch.int32 or offsets.shape != (w1.shape[0],):
        raise ValueError(f"offsets must be int32 [{w1.shape[0]}], got {offsets.dtype} {tuple(offsets.shape)}")


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, w1, w2, activation):
        x, offsets, w1, w2 = x.contiguous(), offsets.contiguous(), w1.contiguous(), w2.contiguous()
        pre = x.new_empty(x.shape[0], w1.shape[-1])
        y = x.new_empty(x.shape)
        grouped_mlp_forward(x, offsets, w1, w2, activation, pre, y)
        ctx.save_for_backward(x, offsets, w1, w2, pre)
        ctx.activation = activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, offsets, w1, w2, pre = ctx.saved_tensors
        dpre, dx = torch.empty_like(pre), torch.empty_like(x)
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        grouped_mlp_backward(dy.contiguous(), x, offsets, w1, w2, ctx.activation, pre, dpre, dx, dw1, dw2)
        return dx, None, dw1, dw2, None


def grouped_mlp(x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
    """y[rows of e] = act(x[rows] @ w1[e]) @ w2[e]; differentiable in x, w1, w2."""
    _check_inputs(x, offsets, w1, w2, activation)
    return _GroupedMLP.apply(x, offsets, w1, w2, activation)
