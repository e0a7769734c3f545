"""Launch configurations of the expert kernels: autotune lists for Hopper (H100/H200), one for
16-bit inputs and one for fp32, narrowed per call to the input dtype and the shape; under the
Triton interpreter a single small config, so CPU tests stay fast.

The tiles are sized for one CTA per SM (up to 128x256 fp32 accumulators with 8 warps, 2-4
pipeline stages of 64-deep bf16 operand tiles), which is also what the persistent launches assume.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton

# Read once: @triton.jit picks interpreter or compiler when the kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programs of a persistent launch under the interpreter: a few, so each loops over several items.
INTERPRET_PROGRAMS = 3

Fits = Callable[[dict, dict], bool]


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class TuneSpace:
    """The configs of one kernel. Rows are (*block sizes in `names` order, num_warps, num_stages)."""

    def __init__(self, names: Sequence[str], half: Sequence[tuple], single: Sequence[tuple],
                 interpret: tuple, dtype_arg: str, fits: Fits | None = None):
        def build(rows):
            return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]

        self._half, self._single = build(half), build(single)
        self.configs = build([interpret]) if INTERPRET else self._half + self._single
        self._dtype_arg, self._fits = dtype_arg, fits

    def _for_dtype(self, dtype: torch.dtype) -> list[triton.Config]:
        if INTERPRET:
            return self.configs
        return self._single if dtype == torch.float32 else self._half

    def prune(self, configs, named_args, **kwargs) -> list[triton.Config]:
        """`early_config_prune` hook: the list for the input dtype, minus tiles wider than the shape."""
        wanted = self._for_dtype(named_args[self._dtype_arg].dtype)
        args = {**named_args, **kwargs}
        fitting = [c for c in wanted if self._fits is None or self._fits(c.kwargs, args)]
        return fitting or wanted[:1]

    def largest(self, name: str, dtype: torch.dtype) -> int:
        """The largest value of a block size any config for `dtype` may pick (to size scratch)."""
        return max(c.kwargs[name] for c in self._for_dtype(dtype))


def _scores_fit(cfg: dict, args: dict) -> bool:
    return cfg["BLOCK_H"] <= max(64, _np2(args["HID"])) and cfg["BLOCK_D"] <= max(64, _np2(args["D"]))


# Checked with `competesmoe-profile --compile` (sm_90, the profiler's shapes, all activations):
# all rows fit shared memory; the scores rows spill at most a few dozen bytes per thread; with
# swiglu the grouped kernels spill ~350 bytes in the act' epilogue (once per tile) and in the
# 4-warp 128x64 weight-gradient tile.
SCORES_FWD = TuneSpace(
    ("BLOCK_T", "BLOCK_H", "BLOCK_D", "BLOCK_K"),
    half=[(128, 128, 64, 64, 8, 3), (64, 128, 128, 64, 8, 3), (128, 64, 256, 64, 8, 3),
          (64, 64, 128, 64, 8, 3), (64, 256, 128, 64, 8, 2), (128, 128, 256, 64, 8, 2)],
    single=[(64, 64, 64, 32, 8, 2), (128, 64, 64, 32, 8, 2), (64, 64, 128, 32, 8, 2)],
    interpret=(16, 16, 16, 16, 1, 1),
    dtype_arg="x_ptr", fits=_scores_fit,
)

# The backward holds more live tiles per phase (see competition.py), so its tiles are narrower;
# BLOCK_T = 256 halves the dW atomics per FLOP.
SCORES_BWD = TuneSpace(
    ("BLOCK_T", "BLOCK_H", "BLOCK_D", "BLOCK_K"),
    half=[(128, 64, 64, 64, 8, 2), (128, 64, 128, 64, 8, 2), (64, 128, 128, 64, 8, 2),
          (64, 64, 128, 64, 8, 2), (256, 32, 64, 64, 8, 2)],
    single=[(128, 32, 64, 32, 8, 2), (64, 32, 64, 32, 8, 2)],
    interpret=(16, 16, 16, 16, 1, 1),
    dtype_arg="x_ptr", fits=_scores_fit,
)


def _rows_fit(cfg: dict, args: dict) -> bool:
    # the act' epilogue holds pre (gate and up for swiglu) beside the accumulator: 128x256 spills
    small_epilogue = args["OUT_DACT"] == "none" or cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 128 * 128
    return cfg["BLOCK_N"] <= max(64, _np2(args["N"])) and small_epilogue


def _wgrad_fit(cfg: dict, args: dict) -> bool:
    return cfg["BLOCK_M"] <= max(64, _np2(args["M"])) and cfg["BLOCK_N"] <= max(64, _np2(args["N"]))


GROUPED_ROWS = TuneSpace(
    ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    half=[(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 4)],
    single=[(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
    interpret=(16, 16, 16, 1, 1),
    dtype_arg="a_ptr", fits=_rows_fit,
)

GROUPED_WGRAD = TuneSpace(
    ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    half=[(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    single=[(64, 64, 32, 4, 3), (128, 64, 32, 8, 3)],
    interpret=(16, 16, 16, 1, 1),
    dtype_arg="a_ptr", fits=_wgrad_fit,
)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (one CTA per SM fits these tiles)."""
    if INTERPRET:
        return INTERPRET_PROGRAMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul precision setting (tf32 unless it is 'highest')."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"
