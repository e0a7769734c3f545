"""Fused competition scores: s[t, e] = mean_c softplus((act(x[t] @ W1[e]) @ W2[e])[c]) for every
token and every expert, forward and backward, without the E x T x h hidden states or the
E x T x d outputs in global memory. Memory is O(T*E) plus one tile-sized slot per program.

Both kernels are persistent: one program per SM walks work items (expert e, token tile) in
expert-major order, so the programs running at any moment share one or two experts' weights in L2.

Forward, per work item (O = act(x W1_e) W2_e is needed whole along h before softplus):
  1. hidden = act(x_tile @ W1_e) [BLOCK_T, h], in BLOCK_H chunks, each a K-loop over d;
  2. for each BLOCK_D chunk of d: O chunk = hidden @ W2_e[:, chunk] (K-loop over h), then
     add the row sums of softplus(O chunk).
  When h <= BLOCK_H (e.g. h = 128) the hidden tile stays in registers (HIDDEN_RESIDENT).
  Otherwise (h = 1024 at the 1B shape: 256 KiB per 128-token tile) it goes to the program's
  scratch slot, written once and read once per d chunk, so no matmul is recomputed; the slots
  (one per SM, ~34 MB at the 1B shape) are small enough to stay L2-resident.

Backward by recomputation, given g = dL/ds [T, E]; with dO = g/d * sigmoid(O), per work item:
  1. pre = x_tile @ W1_e                 -> slot (pre-activations, needed for act')
  2. O = act(pre) @ W2_e, per d chunk    -> dO -> slot
  3. per h chunk: dhidden = dO @ W2_e^T  -> dpre = dhidden * act'(pre) -> slot;
                  dW2_e[h chunk, d chunk] += act(pre)^T @ dO   (atomic, fp32)
  4. per d chunk: dx[tile, d chunk] += dpre @ W1_e[d chunk]^T  (atomic, fp32; sums over e)
                  dW1_e[d chunk, :] += x^T @ dpre              (atomic, fp32)
  That is 3 forward-sized matmul passes: the forward recomputed once, and 2 for the gradients
  (the profiler counts the model's 3x forward for forward+backward). dW is summed over token
  tiles with fp32 atomics rather than split-K partial buffers: a split-K copy of dW1 + dW2 costs
  E*d*(h'+h)*4 bytes per split (1 GiB per split at the 1B shape), while the atomics need none
  and hit L2 because expert-major order keeps the current expert's fp32 dW (16 MiB at the 1B
  shape) hot. Each work item adds O(h*d) values for O(BLOCK_T*h*d) FLOPs, 1.5*BLOCK_T FLOP per
  byte, so BLOCK_T is the knob; programs start their d loops at different chunks so that
  concurrent adds to one expert's dW land on different addresses. Atomics make dW's fp32
  summation order, and so its last bits, vary between runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .activations import activate, check_expert_inputs, load_hidden, softplus, store_pre_grad
from .configs import SCORES_BWD, SCORES_FWD, dot_precision, persistent_programs


@triton.jit
def _pre_tiles(x_ptr, w1_e, rows, row_mask, h0, D, HID, W1COLS, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pre-activations of hidden units h0..h0+BLOCK_H for the token rows, fp32: (gate, up); for
    swiglu both come from one pass over x, otherwise `up` is unused."""
    units = h0 + tl.arange(0, BLOCK_H)
    unit_mask = units < HID
    gate = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    up = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        x = tl.load(x_ptr + rows[:, None] * D + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_offs = ks[:, None] * W1COLS + units[None, :]
        w_mask = k_mask[:, None] & unit_mask[None, :]
        gate = tl.dot(x, tl.load(w1_e + w_offs, mask=w_mask, other=0.0), gate, input_precision=DOT_PRECISION)
        if ACT == "swiglu":
            up = tl.dot(x, tl.load(w1_e + w_offs + HID, mask=w_mask, other=0.0), up, input_precision=DOT_PRECISION)
    return gate, up


@triton.jit
def _load_w2(w2_e, units, cols, HID, D):
    """W2_e[units, cols] as a [BLOCK_H, BLOCK_D] tile, zero outside."""
    return tl.load(w2_e + units[:, None] * D + cols[None, :], mask=(units < HID)[:, None] & (cols < D)[None, :],
                   other=0.0)


@triton.autotune(configs=SCORES_FWD.configs, key=["D", "HID", "E"],
                 prune_configs_by={"early_config_prune": SCORES_FWD.prune})
@triton.heuristics({"HIDDEN_RESIDENT": lambda args: args["HID"] <= args["BLOCK_H"]})
@triton.jit
def _scores_fwd_kernel(x_ptr, w1_ptr, w2_ptr, s_ptr, slots_ptr, T, D, HID, E, SLOT_ROWS,
                       ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                       HIDDEN_RESIDENT: tl.constexpr):
    if ACT == "swiglu":
        W1COLS = 2 * HID
    else:
        W1COLS = HID
    pid = tl.program_id(0)
    slot = slots_ptr + pid.to(tl.int64) * SLOT_ROWS * HID  # [BLOCK_T, HID] hidden of this program's tile
    slot_rows = tl.arange(0, BLOCK_T)
    units = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    t_tiles = tl.cdiv(T, BLOCK_T)
    for work in range(pid, t_tiles * E, tl.num_programs(0)):
        e = work // t_tiles
        rows = ((work % t_tiles) * BLOCK_T + slot_rows).to(tl.int64)
        row_mask = rows < T
        w1_e = w1_ptr + e.to(tl.int64) * D * W1COLS
        w2_e = w2_ptr + e.to(tl.int64) * HID * D

        if HIDDEN_RESIDENT:
            gate, up = _pre_tiles(x_ptr, w1_e, rows, row_mask, 0, D, HID, W1COLS, ACT, DOT_PRECISION,
                                  BLOCK_T, BLOCK_H, BLOCK_K)
            hidden = activate(gate, up, ACT).to(w2_ptr.dtype.element_ty)
        else:
            for h0 in range(0, HID, BLOCK_H):
                gate, up = _pre_tiles(x_ptr, w1_e, rows, row_mask, h0, D, HID, W1COLS, ACT, DOT_PRECISION,
                                      BLOCK_T, BLOCK_H, BLOCK_K)
                tl.store(slot + slot_rows[:, None] * HID + (h0 + units)[None, :],
                         activate(gate, up, ACT).to(slots_ptr.dtype.element_ty), mask=(h0 + units < HID)[None, :])
            tl.debug_barrier()

        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if HIDDEN_RESIDENT:
                out = tl.dot(hidden, _load_w2(w2_e, units, d0 + cols, HID, D), input_precision=DOT_PRECISION)
            else:
                out = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
                for h0 in range(0, HID, BLOCK_H):
                    hid = tl.load(slot + slot_rows[:, None] * HID + (h0 + units)[None, :],
                                  mask=(h0 + units < HID)[None, :], other=0.0)
                    out = tl.dot(hid, _load_w2(w2_e, h0 + units, d0 + cols, HID, D), out,
                                 input_precision=DOT_PRECISION)
            total += tl.sum(tl.where((d0 + cols < D)[None, :], softplus(out), 0.0), axis=1)
        if not HIDDEN_RESIDENT:
            tl.debug_barrier()  # the next work item overwrites the slot
        tl.store(s_ptr + rows * E + e, total / D, mask=row_mask)


@triton.autotune(configs=SCORES_BWD.configs, key=["D", "HID", "E"],
                 prune_configs_by={"early_config_prune": SCORES_BWD.prune},
                 restore_value=["dx_ptr", "dw1_ptr", "dw2_ptr"])
@triton.jit
def _scores_bwd_kernel(x_ptr, w1_ptr, w2_ptr, ds_ptr, dx_ptr, dw1_ptr, dw2_ptr, pre_slots, dout_slots, dpre_slots,
                       T, D, HID, E, SLOT_ROWS,
                       ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    if ACT == "swiglu":
        W1COLS = 2 * HID
    else:
        W1COLS = HID
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    # This program's slots: pre and dpre [BLOCK_T, W1COLS], dO [BLOCK_T, D].
    pre_slot = pre_slots + pid.to(tl.int64) * SLOT_ROWS * W1COLS
    dpre_slot = dpre_slots + pid.to(tl.int64) * SLOT_ROWS * W1COLS
    dout_slot = dout_slots + pid.to(tl.int64) * SLOT_ROWS * D
    slot_rows = tl.arange(0, BLOCK_T)
    units = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    t_tiles = tl.cdiv(T, BLOCK_T)
    d_chunks = tl.cdiv(D, BLOCK_D)
    for work in range(pid, t_tiles * E, tl.num_programs(0)):
        e = work // t_tiles
        t_tile = work % t_tiles
        rows = (t_tile * BLOCK_T + slot_rows).to(tl.int64)
        row_mask = rows < T
        w1_e = w1_ptr + e.to(tl.int64) * D * W1COLS
        w2_e = w2_ptr + e.to(tl.int64) * HID * D
        dw1_e = dw1_ptr + e.to(tl.int64) * D * W1COLS
        dw2_e = dw2_ptr + e.to(tl.int64) * HID * D

        # 1. pre-activations (rows past T hold zeros, so they add nothing below)
        for h0 in range(0, HID, BLOCK_H):
            gate, up = _pre_tiles(x_ptr, w1_e, rows, row_mask, h0, D, HID, W1COLS, ACT, DOT_PRECISION,
                                  BLOCK_T, BLOCK_H, BLOCK_K)
            offs = slot_rows[:, None] * W1COLS + (h0 + units)[None, :]
            store_mask = (h0 + units < HID)[None, :]
            tl.store(pre_slot + offs, gate.to(dtype), mask=store_mask)
            if ACT == "swiglu":
                tl.store(pre_slot + offs + HID, up.to(dtype), mask=store_mask)
        tl.debug_barrier()

        # 2. dO = g/d * sigmoid(O), O recomputed one d chunk at a time (g = 0 on rows past T)
        g = tl.load(ds_ptr + rows * E + e, mask=row_mask, other=0.0).to(tl.float32) / D
        for d0 in range(0, D, BLOCK_D):
            out = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for h0 in range(0, HID, BLOCK_H):
                hid = load_hidden(pre_slot, slot_rows[:, None] * W1COLS + (h0 + units)[None, :],
                                  (h0 + units < HID)[None, :], HID, ACT).to(dtype)
                out = tl.dot(hid, _load_w2(w2_e, h0 + units, d0 + cols, HID, D), out, input_precision=DOT_PRECISION)
            grad_out = g[:, None] * tl.sigmoid(out)
            tl.store(dout_slot + slot_rows[:, None] * D + (d0 + cols)[None, :], grad_out.to(dtype),
                     mask=(d0 + cols < D)[None, :])
        tl.debug_barrier()

        # 3. dpre, and dW2 += act(pre)^T dO
        for h0 in range(0, HID, BLOCK_H):
            unit_mask = h0 + units < HID
            offs = slot_rows[:, None] * W1COLS + (h0 + units)[None, :]
            hid_t = tl.trans(load_hidden(pre_slot, offs, unit_mask[None, :], HID, ACT).to(dtype))
            dhid = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
            for j in range(0, d_chunks):
                d0 = ((j + t_tile) % d_chunks) * BLOCK_D
                col_mask = d0 + cols < D
                dout = tl.load(dout_slot + slot_rows[:, None] * D + (d0 + cols)[None, :], mask=col_mask[None, :],
                               other=0.0)
                w2 = _load_w2(w2_e, h0 + units, d0 + cols, HID, D)
                dhid = tl.dot(dout, tl.trans(w2), dhid, input_precision=DOT_PRECISION)
                tl.atomic_add(dw2_e + (h0 + units)[:, None] * D + (d0 + cols)[None, :],
                              tl.dot(hid_t, dout, input_precision=DOT_PRECISION),
                              mask=unit_mask[:, None] & col_mask[None, :], sem="relaxed")
            store_pre_grad(dpre_slot, pre_slot, offs, unit_mask[None, :], HID, dhid, ACT)
        tl.debug_barrier()

        # 4. dx += dpre W1^T (summed over experts) and dW1 += x^T dpre
        for j in range(0, d_chunks):
            ks = ((j + t_tile) % d_chunks) * BLOCK_D + cols
            k_mask = ks < D
            x_t = tl.trans(tl.load(x_ptr + rows[:, None] * D + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                                   other=0.0))
            dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for c0 in range(0, W1COLS, BLOCK_H):
                c = c0 + units
                c_mask = c < W1COLS
                dpre = tl.load(dpre_slot + slot_rows[:, None] * W1COLS + c[None, :], mask=c_mask[None, :], other=0.0)
                w1_offs = ks[:, None] * W1COLS + c[None, :]
                w1_mask = k_mask[:, None] & c_mask[None, :]
                w1 = tl.load(w1_e + w1_offs, mask=w1_mask, other=0.0)
                dx = tl.dot(dpre, tl.trans(w1), dx, input_precision=DOT_PRECISION)
                tl.atomic_add(dw1_e + w1_offs, tl.dot(x_t, dpre, input_precision=DOT_PRECISION), mask=w1_mask,
                              sem="relaxed")
            tl.atomic_add(dx_ptr + rows[:, None] * D + ks[None, :], dx, mask=row_mask[:, None] & k_mask[None, :],
                          sem="relaxed")
        tl.debug_barrier()  # the next work item overwrites the slots


def _new_scratch(programs: int, rows: int, width: int, like: Tensor) -> Tensor:
    """One [rows, width] slot per program, in the input dtype."""
    return like.new_empty(programs * rows * width)


def scores_forward(x: Tensor, w1: Tensor, w2: Tensor, activation: str, s: Tensor) -> None:
    """Fills s [T, E] (fp32). Inputs contiguous, one dtype."""
    num_tokens, d = x.shape
    num_experts, hidden = w2.shape[0], w2.shape[1]
    if num_tokens == 0:
        return
    programs = persistent_programs(x.device)
    slot_rows = SCORES_FWD.largest("BLOCK_T", x.dtype)
    slots = _new_scratch(programs, slot_rows, hidden, x)
    def grid(meta):
        return (min(programs, triton.cdiv(num_tokens, meta["BLOCK_T"]) * num_experts),)

    _scores_fwd_kernel[grid](x, w1, w2, s, slots, num_tokens, d, hidden, num_experts, slot_rows,
                             ACT=activation, DOT_PRECISION=dot_precision(x.dtype))


def scores_backward(ds: Tensor, x: Tensor, w1: Tensor, w2: Tensor, activation: str,
                    dx: Tensor, dw1: Tensor, dw2: Tensor) -> None:
    """Adds the gradients of sum(ds * s) into the fp32 buffers dx [T, d], dw1 [E, d, h'], dw2 [E, h, d]."""
    num_tokens, d = x.shape
    num_experts, hidden = w2.shape[0], w2.shape[1]
    if num_tokens == 0:
        return
    programs = persistent_programs(x.device)
    slot_rows = SCORES_BWD.largest("BLOCK_T", x.dtype)
    cols = w1.shape[-1]
    pre, dpre = _new_scratch(programs, slot_rows, cols, x), _new_scratch(programs, slot_rows, cols, x)
    dout = _new_scratch(programs, slot_rows, d, x)
    def grid(meta):
        return (min(programs, triton.cdiv(num_tokens, meta["BLOCK_T"]) * num_experts),)

    _scores_bwd_kernel[grid](x, w1, w2, ds, dx, dw1, dw2, pre, dout, dpre, num_tokens, d, hidden, num_experts,
                             slot_rows, ACT=activation, DOT_PRECISION=dot_precision(x.dtype))


class _CompetitionScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, activation):
        x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
        s = torch.empty(x.shape[0], w1.shape[0], device=x.device, dtype=torch.float32)
        scores_forward(x, w1, w2, activation, s)
        ctx.save_for_backward(x, w1, w2)
        ctx.activation = activation
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, ds):
        x, w1, w2 = ctx.saved_tensors
        dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        dw1 = torch.zeros(w1.shape, device=x.device, dtype=torch.float32)
        dw2 = torch.zeros(w2.shape, device=x.device, dtype=torch.float32)
        scores_backward(ds.float().contiguous(), x, w1, w2, ctx.activation, dx, dw1, dw2)
        return dx.to(x.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype), None


def competition_scores(x: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
    """s [T, E] fp32, s[t, e] = mean over d of softplus(act(x[t] @ w1[e]) @ w2[e]); differentiable
    in x, w1, w2."""
    check_expert_inputs(x, w1, w2, activation)
    return _CompetitionScores.apply(x, w1, w2, activation)
