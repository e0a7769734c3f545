"""The Triton expert kernels against a plain float64 reference, in the Triton interpreter on CPU.

The interpreter is chosen when the kernels are decorated, i.e. when Triton code is first imported
with TRITON_INTERPRET=1 set, and other test files in this pytest process may have imported torch
and Triton already. So the checks run in subprocesses (one per dtype, in parallel) that execute
this file as a script and print the errors per case as JSON; the tests assert on those.

Every case draws its random inputs from a fixed seed, so a failure replays as it is (set
COMPETESMOE_KERNEL_TEST_SEED to try others; a failure names the seed). The inputs have ragged
expert loads: empty experts first, in the middle and last, a group longer than one row tile, and
row/token counts and widths that are not multiples of the interpreter's 16-wide blocks. Kernel
outputs and scratch are poisoned with NaN beforehand, so an element a kernel fails to write shows
up; the atomically accumulated gradient buffers start from random values that are subtracted
afterwards.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# max |kernel - reference| / max |reference| over each tensor. fp32 lands near 1e-7; fp16 rounds
# the stored intermediates (pre-activations, hidden, dO, dpre) to 11-bit mantissas, ~1e-3.
TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3}
# Hidden widths for the scores: 12 fits one 16-wide hidden block (the forward keeps it in
# registers; swiglu's 24 W1 columns straddle a block), 24 takes two blocks, the last one partial
# (the forward goes through its scratch slot). The grouped kernels have no such modes.
NUM_EXPERTS, D_MODEL, NUM_TOKENS = 6, 24, 21
# The scores have no expert loads to vary, and fewer experts keep the interpreter quick.
SCORE_EXPERTS = 3
KERNEL_CASES = ([f"grouped_mlp-{act}-h24" for act in ACTIVATIONS]
                + [f"scores-{act}-h{hidden}" for act in ACTIVATIONS for hidden in (12, 24)])
# The autograd wrappers behind TritonBackend, end to end (dtype handling, saved tensors).
BACKEND_CASES = ["backend-swiglu-h12"]
CASES = KERNEL_CASES + BACKEND_CASES


# ---- float64 reference, one expert at a time ------------------------------------------------

def act_ref(pre: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return pre.clamp_min(0)
    if activation == "gelu":
        return 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))
    if activation == "silu":
        return pre * torch.sigmoid(pre)
    gate, up = pre.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def expert_ref(x, w1_e, w2_e, activation):
    return act_ref(x @ w1_e, activation) @ w2_e


def mlp_ref(x, offsets, w1, w2, activation):
    starts = [0] + offsets.tolist()[:-1]
    return torch.cat([expert_ref(x[s:e], w1[i], w2[i], activation)
                      for i, (s, e) in enumerate(zip(starts, offsets.tolist()))])


def scores_ref(x, w1, w2, activation):
    return torch.stack([F.softplus(expert_ref(x, w1[i], w2[i], activation)).mean(-1)
                        for i in range(w1.shape[0])], dim=1)


# ---- the cases, run inside the interpreter subprocess ---------------------------------------

def _inputs(gen, num_rows, hidden, activation, dtype, num_experts=NUM_EXPERTS):
    cols = 2 * hidden if activation == "swiglu" else hidden
    x = torch.randn(num_rows, D_MODEL, generator=gen)
    w1 = torch.randn(num_experts, D_MODEL, cols, generator=gen) * D_MODEL ** -0.5
    w2 = torch.randn(num_experts, hidden, D_MODEL, generator=gen) * hidden ** -0.5
    return x.to(dtype), w1.to(dtype), w2.to(dtype)


def _ragged_offsets(gen):
    """Loads [0, a, b, 0, c, 0]: b spans two or more 16-row tiles, the total is not a multiple of 16."""
    a, b, c = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 16), (17, 32), (1, 16)))
    if (a + b + c) % 16 == 0:
        c += 1
    return torch.tensor([0, a, b, 0, c, 0]).cumsum(0).to(torch.int32)


def _reference_grads(fn, inputs, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.double())


def _rel_err(got, want):
    got = got.double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _nan(shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype)


def _check_grouped_mlp(gen, activation, hidden, dtype):
    from competesmoe.kernels.grouped_mlp import grouped_mlp_backward, grouped_mlp_forward

    offsets = _ragged_offsets(gen)
    x, w1, w2 = _inputs(gen, int(offsets[-1]), hidden, activation, dtype)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    pre, y = _nan((x.shape[0], w1.shape[-1]), dtype), _nan(x.shape, dtype)
    grouped_mlp_forward(x, offsets, w1, w2, activation, pre, y)
    dpre, dx, dw1, dw2 = _nan(pre.shape, dtype), _nan(x.shape, dtype), _nan(w1.shape, dtype), _nan(w2.shape, dtype)
    grouped_mlp_backward(dy, x, offsets, w1, w2, activation, pre, dpre, dx, dw1, dw2)

    y_ref, (dx_ref, dw1_ref, dw2_ref) = _reference_grads(
        lambda *t: mlp_ref(t[0], offsets, t[1], t[2], activation), (x, w1, w2), dy)
    pre_ref = torch.cat([x[s:e].double() @ w1[i].double() for i, (s, e) in
                         enumerate(zip([0] + offsets.tolist()[:-1], offsets.tolist()))])
    return {"pre": _rel_err(pre, pre_ref), "y": _rel_err(y, y_ref), "dx": _rel_err(dx, dx_ref),
            "dw1": _rel_err(dw1, dw1_ref), "dw2": _rel_err(dw2, dw2_ref)}


def _check_scores(gen, activation, hidden, dtype):
    from competesmoe.kernels import competition

    competition._new_scratch = lambda programs, rows, width, like: _nan((programs * rows * width,), like.dtype)
    x, w1, w2 = _inputs(gen, NUM_TOKENS, hidden, activation, dtype, SCORE_EXPERTS)
    ds = torch.randn(NUM_TOKENS, SCORE_EXPERTS, generator=gen)
    s = _nan((NUM_TOKENS, SCORE_EXPERTS), torch.float32)
    competition.scores_forward(x, w1, w2, activation, s)
    # small, so that subtracting them again costs no precision against gradients of ~1e-2
    bases = [1e-3 * torch.randn(t.shape, generator=gen) for t in (x, w1, w2)]
    grads = [b.clone() for b in bases]
    competition.scores_backward(ds, x, w1, w2, activation, *grads)

    s_ref, (dx_ref, dw1_ref, dw2_ref) = _reference_grads(lambda *t: scores_ref(*t, activation), (x, w1, w2), ds)
    dx, dw1, dw2 = (g - b for g, b in zip(grads, bases))
    return {"s": _rel_err(s, s_ref), "dx": _rel_err(dx, dx_ref), "dw1": _rel_err(dw1, dw1_ref),
            "dw2": _rel_err(dw2, dw2_ref)}


def _check_backend(gen, activation, hidden, dtype):
    from competesmoe.kernels import TritonBackend, triton_usable

    assert triton_usable(torch.device("cpu")) and TritonBackend.name == "triton"
    backend = TritonBackend()
    offsets = _ragged_offsets(gen)
    x, w1, w2 = (t.requires_grad_() for t in _inputs(gen, int(offsets[-1]), hidden, activation, dtype))
    y = backend.mlp(x, offsets, w1, w2, activation)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    got = (y, *torch.autograd.grad(y, (x, w1, w2), dy))
    s = backend.scores(x, w1, w2, activation)
    ds = torch.randn(s.shape, generator=gen)
    got_s = (s, *torch.autograd.grad(s, (x, w1, w2), ds))
    assert y.dtype == dtype and s.dtype == torch.float32 and all(g.dtype == dtype for g in got[1:] + got_s[1:])

    y_ref, mlp_grads = _reference_grads(lambda *t: mlp_ref(t[0], offsets, t[1], t[2], activation), (x, w1, w2), dy)
    s_ref, score_grads = _reference_grads(lambda *t: scores_ref(*t, activation), (x, w1, w2), ds)
    names = ("y", "dx", "dw1", "dw2", "s", "ds/dx", "ds/dw1", "ds/dw2")
    return {n: _rel_err(g, r) for n, g, r in zip(names, got + got_s, (y_ref, *mlp_grads, s_ref, *score_grads))}


CHECKS = {"grouped_mlp": _check_grouped_mlp, "scores": _check_scores, "backend": _check_backend}


def run_cases(dtype_name: str, seed: int) -> dict:
    results = {}
    for case in CASES:
        kernel, activation, hidden = case.split("-")
        gen = torch.Generator().manual_seed(seed + len(results))
        errors = CHECKS[kernel](gen, activation, int(hidden[1:]), DTYPES[dtype_name])
        results[case] = {"errors": errors, "seed": seed}
    return results


# ---- the tests, in the pytest process -------------------------------------------------------

@pytest.fixture(scope="module")
def interpreter_results():
    seed = int(os.environ.get("COMPETESMOE_KERNEL_TEST_SEED", "0"))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    procs = {name: subprocess.Popen([sys.executable, __file__, name, str(seed)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in DTYPES}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"interpreter run ({name}, seed {seed}) failed:\n{err[-6000:]}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64_reference(interpreter_results, case, dtype_name):
    result = interpreter_results[dtype_name][case]
    tol = TOLERANCE[dtype_name]
    bad = {name: err for name, err in result["errors"].items() if not err <= tol}
    assert not bad, (f"{case} ({dtype_name}): relative errors above {tol}: {bad} "
                     f"(replay with COMPETESMOE_KERNEL_TEST_SEED={result['seed']})")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_gpu():
    """The compiled kernels, bf16 included, against TorchBackend in float64 (autotuning included)."""
    from competesmoe.profiling.kernels import run_checks

    assert run_checks(torch.device("cuda")) == 0


def test_triton_usable_never_raises():
    from competesmoe.kernels import triton_usable

    for device in ("cpu", "cuda", "meta", torch.device("cuda", 7)):
        assert isinstance(triton_usable(torch.device(device)), bool)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run by the tests with TRITON_INTERPRET=1"
    print(json.dumps(run_cases(sys.argv[1], int(sys.argv[2]))))
