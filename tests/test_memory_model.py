"""The memory model (competesmoe/profiling/memory.py) computes what its docstring writes, checked
on small cases worked by hand; the benchmark holds it against measurements."""
from pathlib import Path

import pytest

from competesmoe.config import load_config
from competesmoe.model.config import ModelConfig, MoEConfig
from competesmoe.profiling.memory import (
    Layout,
    ParamCounts,
    activation_bytes,
    checkpoint_save_bytes,
    param_counts,
    state_bytes,
)

ROOT = Path(__file__).resolve().parent.parent


def test_param_counts_split_the_reference_model_into_dense_and_experts():
    cfg = load_config(ROOT / "configs" / "reference_lm.yaml")
    m = cfg.model
    model = ModelConfig(**{**m.__dict__, "vocab_size": cfg.data.vocab_size})
    V, d, L, E, h = model.vocab_size, m.d_model, m.n_layers, m.moe.num_experts, m.moe.expert_hidden
    inner = m.n_heads * m.head_dim
    counts = param_counts(model)
    assert counts.experts == L * E * 2 * d * h
    assert counts.dense == 2 * V * d + L * (4 * d * inner + 4 * d + E * d) + 2 * d


@pytest.mark.parametrize("zero,want", [
    (0, {"weights": 2000, "gradients": 2000, "optimizer": 4000}),
    (1, {"weights": 2000, "gradients": 2000, "optimizer": 12 * (25 + 200)}),
    (2, {"weights": 2000, "gradients": 4 * (25 + 200), "optimizer": 12 * (25 + 200)}),
])
def test_state_bytes_by_zero_stage(zero, want):
    # 100 dense and 800 expert parameters, 4 ranks, EP=2: a rank holds 100 + 400; its ZeRO partition
    # is 100 / 4 dense + 400 / 2 (expert-data-parallel size 2) expert parameters
    assert state_bytes(ParamCounts(dense=100, experts=800), Layout(world=4, ep=2, zero_stage=zero)) == want


def test_checkpoint_bytes_each_tensor_once():
    counts, layout = ParamCounts(dense=100, experts=800), Layout(world=4, ep=2)
    written = [checkpoint_save_bytes(counts, layout, r) for r in range(4)]
    assert written == [12 * 500, 12 * 400, 0, 0] and sum(written) == 12 * 900


def test_activation_bytes_per_checkpointing_choice_by_hand():
    # d 8, 2 heads of 4 (i = 8), 2 experts per token of 16 (relu: h1 = h = 16), 4 experts, 4 layers, V 10.
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=4, n_heads=2,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, activation="relu"))
    attention = 2 * 8 + 7 * 8  # 72
    ffn = 2 * 8 + 2 * (3 * 8 + 16 + 16) + 3 * 4  # 140
    logits = 2 * 10
    want = {"none": 4 * (attention + ffn), "full": 4 * 8 + (attention + ffn),
            "ffn": 4 * (attention + 8) + ffn, "attn": 4 * (8 + ffn) + attention}
    for choice, per_token in want.items():
        assert activation_bytes(cfg, 100, choice) == 100 * (per_token + logits) * 4, choice
    assert activation_bytes(cfg, 100, "none", dtype_bytes=2) == 100 * (want["none"] + logits) * 2
    # every second block checkpointed: blocks 0 and 2, as parallel/activation.py chooses them
    assert activation_bytes(cfg, 100, "full", every=2) == 100 * (2 * (attention + ffn) + 2 * 8 + attention + ffn
                                                                 + logits) * 4
    # a competition step adds 4E per token per MoE layer and one chunk of experts' outputs (fp32)
    chunk = 100 * (16 + 8) * 4 * 4
    assert activation_bytes(cfg, 100, "none", compete=True) == 100 * (want["none"] + 4 * 4 * 4 + logits) * 4 + chunk
