"""Ahead-of-time compilation of the expert kernels for a GPU target, on a machine without a GPU.

Compiles every autotune config the kernels would try at the profiler's shapes, through Triton's
own pipeline down to a cubin (ptxas ships with Triton), and reports registers, spill bytes and
shared memory per variant. It catches what the CPU interpreter cannot: code that does not lower
for the target, tiles that spill, or pipelines that overflow shared memory.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .competition import _scores_bwd_kernel, _scores_fwd_kernel
from .configs import GROUPED_ROWS, GROUPED_WGRAD, SCORES_BWD, SCORES_FWD, TuneSpace, dot_precision
from .grouped_mlp import _grouped_rows_kernel, _grouped_wgrad_kernel

# Usable shared memory per block by compute capability (Ampere 163 KiB, Ada 99 KiB, Hopper 227 KiB).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Pointer arguments that are fp32 or int32 whatever the input dtype; other pointers take it.
_FIXED_POINTERS = {"s_ptr": "*fp32", "ds_ptr": "*fp32", "dx_ptr": "*fp32", "dw1_ptr": "*fp32",
                   "dw2_ptr": "*fp32", "offsets_ptr": "*i32"}
KERNELS = {"scores_fwd": _scores_fwd_kernel, "scores_bwd": _scores_bwd_kernel,
           "grouped_rows": _grouped_rows_kernel, "grouped_wgrad": _grouped_wgrad_kernel}


@dataclass
class Variant:
    """One compiled specialisation; picklable, so variants can compile in worker processes."""
    kernel: str
    label: str
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    error: str = ""


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through the autotuner and heuristics wrappers
    return kernel


def _signature(fn, dtype: torch.dtype) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in _FIXED_POINTERS:
            sig[p.name] = _FIXED_POINTERS[p.name]
        elif p.name.endswith(("_ptr", "_slots")):
            sig[p.name] = "*" + _TRITON_TYPES[dtype]
        else:
            sig[p.name] = "i32"
    return sig


def variants(shapes, activations, dtype: torch.dtype) -> Iterator[Variant]:
    """Every config the autotuner would try at these shapes, for each kernel and use of it."""
    def pruned(space: TuneSpace, first_arg: str, args: dict):
        return space.prune(space.configs, {first_arg: torch.empty(0, dtype=dtype), **args})

    def variant(kernel, label, cfg, constexprs):
        return Variant(kernel, label, {**constexprs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)

    precision = dot_precision(dtype)
    for shape in shapes:
        for act in activations:
            cols = 2 * shape.hidden if act == "swiglu" else shape.hidden
            common = dict(ACT=act, DOT_PRECISION=precision)
            args = dict(D=shape.d, HID=shape.hidden, E=shape.experts, **common)
            for cfg in pruned(SCORES_FWD, "x_ptr", args):
                resident = shape.hidden <= cfg.kwargs["BLOCK_H"]
                yield variant("scores_fwd", f"{shape.name} {act}", cfg, {**common, "HIDDEN_RESIDENT": resident})
            for cfg in pruned(SCORES_BWD, "x_ptr", args):
                yield variant("scores_bwd", f"{shape.name} {act}", cfg, common)
            # the four row products of the grouped MLP and its two weight gradients
            rows_uses = [("x@W1", cols, "none", "none"), ("act(pre)@W2", shape.d, act, "none"),
                         ("dy@W2^T", shape.hidden, "none", act), ("dpre@W1^T", shape.d, "none", "none")]
            for use, n, a_act, out_dact in rows_uses:
                for cfg in pruned(GROUPED_ROWS, "a_ptr", dict(N=n, OUT_DACT=out_dact)):
                    yield variant("grouped_rows", f"{shape.name} {act} {use}", cfg,
                                  dict(A_ACT=a_act, OUT_DACT=out_dact, E_POW2=triton.next_power_of_2(shape.experts),
                                       DOT_PRECISION=precision))
            wgrad_uses = [("act(pre)^T dy", shape.hidden, shape.d, act), ("x^T dpre", shape.d, cols, "none")]
            for use, m, n, a_act in wgrad_uses:
                for cfg in pruned(GROUPED_WGRAD, "a_ptr", dict(M=m, N=n)):
                    yield variant("grouped_wgrad", f"{shape.name} {act} {use}", cfg,
                                  dict(A_ACT=a_act, DOT_PRECISION=precision))


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes per thread, i.e. register spills) from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(item.split(":", 1) for item in text.split() if ":" in item and item.split(":", 1)[1].isdigit())
    return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"])


def _divisible_by_16(fn) -> dict:
    """What the JIT specialises on at the profiler's shapes: every pointer and integer argument is a
    multiple of 16 (without it loads cannot be vectorised and the K loops are not pipelined)."""
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if not p.is_constexpr}


def compile_variant(variant: Variant, dtype: torch.dtype, arch: int) -> Variant:
    """Fills in the variant's resources, or its error."""
    fn = _jit_function(KERNELS[variant.kernel])
    try:
        compiled = triton.compile(ASTSource(fn, _signature(fn, dtype), variant.constexprs, _divisible_by_16(fn)),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
        variant.registers, variant.spill_bytes = _resource_usage(compiled.asm["cubin"])
        variant.shared_bytes = compiled.metadata.shared
    except Exception as exc:  # report every failing variant, not just the first
        variant.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return variant
