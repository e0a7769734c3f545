"""Kernel profiler: the Triton expert kernels against the pure-torch backend.

  competesmoe-profile [--shapes ref,mid,1b] [--dtype bf16] [--activation relu] [--out FILE.json]
      times, per shape, the competition scores (Triton vs TorchBackend.scores) and the sparse
      grouped MLP (Triton vs TorchBackend.mlp, i.e. torch.nn.functional.grouped_mm on Hopper bf16),
      forward and forward+backward, and prints time, TFLOP/s, % of the device's measured bf16
      matmul peak, peak extra memory, and the Triton speed-up; --out also writes them as JSON.
  competesmoe-profile --check
      correctness at small shapes against TorchBackend in float64; on a CPU-only machine the
      kernels run in the Triton interpreter (set TRITON_INTERPRET=1). Exits non-zero on a mismatch.
  competesmoe-profile --compile [SM]
      no GPU needed: compiles every kernel variant and autotune config at --shapes for compute
      capability SM (default 90, Hopper) and reports registers, spills and shared memory.
      Exits non-zero if a variant fails to compile or overflows shared memory.

--activation takes a comma-separated list. Modes are flags of one mutually exclusive group,
so a whole-step mode can join them.
The installed entry point is competesmoe.profiling.kernels:main (tools/profile_kernels.py calls it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import torch

from competesmoe.errors import cli_main
from competesmoe.kernels.spec import ACTIVATIONS, expert_flops_per_token, w1_columns

# grouped_mm_supported tells which torch kernel the baseline's mlp runs, for the table
from competesmoe.model.moe.experts import TorchBackend, grouped_mm_supported

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    experts: int
    top_k: int
    d: int
    hidden: int


SHAPES = {
    # the paper's LM reference: 16k tokens per GPU
    "ref": Shape("ref", 16384, 64, 8, 512, 128),
    "mid": Shape("mid", 16384, 64, 8, 1024, 512),
    # 1B-class layer
    "1b": Shape("1b", 16384, 64, 8, 2048, 1024),
}


def ragged_offsets(rows: int, experts: int, gen: torch.Generator, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """int32 group ends for `rows` rows spread at random (multinomially) over the experts not in `empty`."""
    probs = torch.ones(experts)
    probs[list(empty)] = 0
    choice = torch.multinomial(probs, rows, replacement=True, generator=gen)
    return torch.bincount(choice, minlength=experts).cumsum(0).to(torch.int32)


def _expert_inputs(rows: int, shape: Shape, activation: str, dtype, device, gen) -> tuple[torch.Tensor, ...]:
    cols = w1_columns(shape.hidden, activation)
    x = torch.randn(rows, shape.d, generator=gen)
    w1 = torch.randn(shape.experts, shape.d, cols, generator=gen) * shape.d ** -0.5
    w2 = torch.randn(shape.experts, shape.hidden, shape.d, generator=gen) * shape.hidden ** -0.5
    return tuple(t.to(device=device, dtype=dtype) for t in (x, w1, w2))


# ---- --check ---------------------------------------------------------------------------------

def _check_tolerance(dtype: torch.dtype) -> float:
    """Max |triton - float64| / max |float64| accepted per tensor."""
    if dtype == torch.float32:
        return 1e-5 if torch.get_float32_matmul_precision() == "highest" else 5e-3
    return {torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]


def _outputs_and_grads(fn, inputs: tuple[torch.Tensor, ...], gen) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def run_checks(device: torch.device) -> int:
    from competesmoe.kernels import TritonBackend, triton_usable

    if not triton_usable(device):
        print(f"Triton cannot run on {device}: use a CUDA GPU, or set TRITON_INTERPRET=1 for the CPU interpreter",
              file=sys.stderr)
        return 2
    triton_backend, torch_backend = TritonBackend(), TorchBackend()
    dtypes = (torch.float32, torch.float16) if device.type == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    # widths that are not multiples of the blocks; h=12 fits one interpreter hidden block, h=24 takes two
    cases = [("relu", 12), ("gelu", 24), ("silu", 12), ("swiglu", 24)]
    failures = 0
    for dtype in dtypes:
        for activation, hidden in cases:
            shape = Shape("check", 37, 6, 2, 24, hidden)
            gen = torch.Generator().manual_seed(hidden)
            offsets = ragged_offsets(shape.tokens, shape.experts, gen, empty=(0, 3, 5)).to(device)
            inputs = _expert_inputs(shape.tokens, shape, activation, dtype, device, gen)
            errors = {}
            calls = (
                ("mlp", lambda b, x, w1, w2, offsets=offsets, activation=activation:
                    b.mlp(x, offsets, w1, w2, activation)),
                ("scores", lambda b, x, w1, w2, activation=activation: b.scores(x, w1, w2, activation)),
            )
            for name, run in calls:
                seed = int(torch.randint(0, 2**31, (1,), generator=gen))
                got = _outputs_and_grads(partial(run, triton_backend), inputs, torch.Generator().manual_seed(seed))
                want = _outputs_and_grads(partial(run, torch_backend), tuple(t.double() for t in inputs),
                                          torch.Generator().manual_seed(seed))
                for part, g, w in zip(("out", "dx", "dw1", "dw2"), got, want):
                    err = ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
                    errors[f"{name}.{part}"] = err if math.isfinite(err) else math.inf
            worst = max(errors, key=errors.get)
            ok = errors[worst] <= _check_tolerance(dtype)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(dtype).removeprefix('torch.'):8s} {activation:6s} h={hidden:<3d} "
                  f"worst {worst} {errors[worst]:.1e} (tolerance {_check_tolerance(dtype):.0e})")
    print(f"{failures} of {len(dtypes) * len(cases)} checks failed" if failures else "all checks passed")
    return 1 if failures else 0


# ---- benchmarks ------------------------------------------------------------------------------

@dataclass
class Row:
    kernel: str
    shape: str
    activation: str
    pass_: str
    impl: str
    ms: float
    tflops: float
    pct_peak: float
    peak_mib: float
    speedup: float = math.nan


def measure_matmul_peak(device: torch.device) -> float:
    """bf16 TFLOP/s of a large torch.matmul: the reference for '% of peak'."""
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / (do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode="median") * 1e-3) / 1e12


def _time_and_memory(fn) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what was live before the call)."""
    from triton.testing import do_bench

    fn()  # compile and autotune outside the timed runs, whose count do_bench sizes from the first ones
    ms = do_bench(fn, warmup=100, rep=500, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**20


def _workloads(shape: Shape, activation: str, dtype, device):
    """(kernel, model FLOPs of one forward, run(backend, with_backward), what TorchBackend runs)
    for the competition scores and the sparse grouped MLP."""
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = _expert_inputs(shape.tokens, shape, activation, dtype, device, gen)
    rows = shape.tokens * shape.top_k
    offsets = ragged_offsets(rows, shape.experts, gen).to(device)
    xs = torch.randn(rows, shape.d, generator=gen).to(device=device, dtype=dtype)
    per_token = expert_flops_per_token(shape.d, shape.hidden, activation)

    def runner(call, inputs):
        def run(backend, with_backward):
            leaves = [t.requires_grad_(with_backward) for t in inputs]
            out = call(backend, *leaves)
            if with_backward:
                torch.autograd.grad(out, leaves, torch.ones_like(out))
        return run

    return [
        ("scores", shape.tokens * shape.experts * per_token,
         runner(lambda b, x_, w1_, w2_: b.scores(x_, w1_, w2_, activation), (x, w1, w2)), "torch/checkpoint"),
        ("mlp", rows * per_token,
         runner(lambda b, x_, w1_, w2_: b.mlp(x_, offsets, w1_, w2_, activation), (xs, w1, w2)),
         "torch/grouped_mm" if grouped_mm_supported(xs, w1) else "torch/padded_bmm"),
    ]


def run_benchmarks(device: torch.device, shapes: list[Shape], activations: list[str], dtype) -> tuple[float, list[Row]]:
    from competesmoe.kernels import TritonBackend

    peak = measure_matmul_peak(device)
    backends = {"triton": TritonBackend(), "torch": TorchBackend()}
    rows: list[Row] = []
    for shape, activation in ((s, a) for s in shapes for a in activations):
        for kernel, flops, run, torch_label in _workloads(shape, activation, dtype, device):
            for pass_, with_backward, factor in (("fwd", False, 1), ("fwd+bwd", True, 3)):
                timed = {}
                for impl, backend in backends.items():
                    try:
                        ms, mib = _time_and_memory(partial(run, backend, with_backward))
                    except torch.cuda.OutOfMemoryError:
                        ms, mib = math.inf, math.inf
                    tflops = factor * flops / (ms * 1e-3) / 1e12
                    label = torch_label if impl == "torch" else impl
                    timed[impl] = Row(kernel, shape.name, activation, pass_, label, ms, tflops,
                                      100 * tflops / peak, mib)
                timed["triton"].speedup = timed["torch"].ms / timed["triton"].ms
                rows += [timed["triton"], timed["torch"]]
                print(_format(timed["triton"]), _format(timed["torch"]), sep="\n", flush=True)
    return peak, rows


_HEADER = (f"{'kernel':7s} {'shape':5s} {'act':6s} {'pass':8s} {'impl':17s} {'ms':>9s} {'TFLOP/s':>8s} "
           f"{'%peak':>6s} {'peak MiB':>9s} {'speed-up':>8s}")


def _format(r: Row) -> str:
    speedup = "" if math.isnan(r.speedup) else f"{r.speedup:7.2f}x"
    return (f"{r.kernel:7s} {r.shape:5s} {r.activation:6s} {r.pass_:8s} {r.impl:17s} {r.ms:9.3f} {r.tflops:8.1f} "
            f"{r.pct_peak:6.1f} {r.peak_mib:9.0f} {speedup:>8s}")


# ---- --compile -------------------------------------------------------------------------------

def run_compile(arch: int, shapes: list[Shape], activations: list[str], dtype) -> int:
    from competesmoe.kernels import configs

    if configs.INTERPRET:
        print("--compile needs the compiler: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from competesmoe.kernels import aot

    todo = list(aot.variants(shapes, activations, dtype))
    print(f"compiling {len(todo)} variants for sm_{arch}, {str(dtype).removeprefix('torch.')}")
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        done = list(pool.map(partial(aot.compile_variant, dtype=dtype, arch=arch), todo))
    failures = 0
    print(f"{'kernel':13s} {'use':28s} {'blocks':18s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill B':>7s} "
          f"{'smem KiB':>8s}")
    for v in done:
        blocks = "x".join(str(val) for key, val in v.constexprs.items() if key.startswith("BLOCK_"))
        problem = v.error or ("shared memory overflow" if v.shared_bytes > aot.MAX_SHARED_BYTES.get(arch, math.inf)
                              else "")
        failures += bool(problem)
        print(f"{v.kernel:13s} {v.label:28s} {blocks:18s} {v.num_warps:5d} {v.num_stages:6d} {v.registers:4d} "
              f"{v.spill_bytes:7d} {v.shared_bytes / 1024:8.0f} {problem}")
    print(f"{failures} of {len(done)} variants failed" if failures else "all variants compiled")
    return 1 if failures else 0


def _choices(allowed):
    def parse(text: str) -> list[str]:
        items = text.split(",")
        unknown = [i for i in items if i not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return items
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="competesmoe-profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="correctness checks at small shapes, then exit")
    mode.add_argument("--compile", type=int, nargs="?", const=90, metavar="SM",
                      help="compile all variants for compute capability SM (default 90), no GPU needed")
    mode.add_argument("--steps", metavar="CONFIG",
                      help="profile whole training steps of CONFIG (SMoE, CompeteSMoE, forced competition)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the --steps config")
    p.add_argument("--iters", type=int, default=10, help="--steps: timed steps per variant")
    p.add_argument("--trace-dir", help="--steps: write a chrome trace per variant here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=_choices(SHAPES), default=list(SHAPES), help=f"some of {', '.join(SHAPES)}")
    p.add_argument("--activation", type=_choices(ACTIVATIONS), default=["relu"],
                   help=f"some of {', '.join(ACTIVATIONS)}")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--out", help="write the timing results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return cli_main(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    shapes = [SHAPES[s] for s in args.shapes]
    if args.check:
        return run_checks(device)
    if args.compile is not None:
        return run_compile(args.compile, shapes, args.activation, DTYPES[args.dtype])
    if args.steps:
        from pathlib import Path

        from competesmoe.config import load_config
        from competesmoe.profiling.steps import profile_training_steps

        profile_training_steps(load_config(args.steps, args.overrides), device, steps=args.iters,
                               trace_dir=Path(args.trace_dir) if args.trace_dir else None,
                               out=Path(args.out) if args.out else None)
        return 0
    if device.type != "cuda":
        print("timing needs a CUDA device (--check and --compile run without one)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(device)}, {args.dtype}")
    print(_HEADER)
    peak, rows = run_benchmarks(device, shapes, args.activation, DTYPES[args.dtype])
    print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s; TFLOP/s count model FLOPs (fwd+bwd = 3x fwd)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "dtype": args.dtype,
                       "matmul_peak_tflops": peak, "shapes": {s.name: asdict(s) for s in shapes},
                       "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
