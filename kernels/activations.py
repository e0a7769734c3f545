"""Element-wise pieces shared by the expert kernels: the activations and their derivatives,
softplus, tile loads/stores that apply them on the fly, and the check of the expert weights'
layout both entry points share.

Pre-activation buffers hold W1's columns: for swiglu the `hidden` gate columns then the `hidden`
up columns, so the up value of hidden unit j sits `hidden` columns right of its gate. Every
buffer these helpers read or write has unit column stride. All math is fp32.
"""
import triton
import triton.language as tl
from torch import Tensor

from .spec import ACTIVATIONS, w1_columns


def check_expert_inputs(x: Tensor, w1: Tensor, w2: Tensor, activation: str) -> None:
    """x [T, d], w1 [E, d, h or 2h], w2 [E, h, d], all of one dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'")
    num_experts, d, cols = w1.shape
    hidden = w2.shape[1]
    if w2.shape != (num_experts, hidden, d) or cols != w1_columns(hidden, activation) or x.dim() != 2 \
            or x.shape[1] != d:
        raise ValueError(f"shapes do not match ({activation}): x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    if not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(f"x, w1, w2 must share a dtype, got {x.dtype}, {w1.dtype}, {w2.dtype}")


@triton.jit
def _silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def _silu_grad(z):
    sig = tl.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def activate(gate, up, ACT: tl.constexpr):
    """act(pre) from fp32 pre-activations; `up` is only read by swiglu."""
    if ACT == "relu":
        out = tl.maximum(gate, 0.0)
    elif ACT == "gelu":
        # exact erf form, as torch.nn.functional.gelu by default
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    elif ACT == "silu":
        out = _silu(gate)
    else:
        out = _silu(gate) * up
    return out


@triton.jit
def softplus(z):
    # log(1 + e^z) without overflow; torch's threshold=20 shortcut differs by < 3e-9
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def load_hidden(pre_ptr, offs, mask, hidden, ACT: tl.constexpr):
    """act(pre) in fp32 for the hidden units whose gate columns are at `offs`."""
    gate = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = gate
    if ACT == "swiglu":
        up = tl.load(pre_ptr + offs + hidden, mask=mask, other=0.0).to(tl.float32)
    return activate(gate, up, ACT)


@triton.jit
def store_pre_grad(dpre_ptr, pre_ptr, offs, mask, hidden, dhidden, ACT: tl.constexpr):
    """dL/dpre = dL/dhidden * act'(pre) for the hidden units at `offs`; for swiglu this writes
    both the gate and the up columns. dpre and pre share one layout."""
    gate = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out_ty = dpre_ptr.dtype.element_ty
    if ACT == "swiglu":
        up = tl.load(pre_ptr + offs + hidden, mask=mask, other=0.0).to(tl.float32)
        tl.store(dpre_ptr + offs, (dhidden * up * _silu_grad(gate)).to(out_ty), mask=mask)
        tl.store(dpre_ptr + offs + hidden, (dhidden * _silu(gate)).to(out_ty), mask=mask)
    else:
        if ACT == "relu":
            slope = (gate > 0.0).to(tl.float32)
        elif ACT == "gelu":
            cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
            slope = cdf + gate * 0.3989422804014327 * tl.exp(-0.5 * gate * gate)
        else:
            slope = _silu_grad(gate)
        tl.store(dpre_ptr + offs, (dhidden * slope).to(out_ty), mask=mask)
