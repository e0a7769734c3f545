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
    # d 8, 2 heads of 4 (i = 8), 2 experts per token of 16 (relu: 16 kept), 4 experts, 4 layers, V 10.
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=4, n_heads=2,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, activation="relu"))
    attention = 2 * 8 + 7 * 8  # 72
    ffn = 2 * 8 + 2 * (2 * 8 + 16) + 3 * 4  # 92
    output = (2 * 8 + 10) * 4 + 10 * 4  # bytes: final norm and logits in the activation dtype, log-probs in fp32
    want = {"none": 4 * (attention + ffn), "full": 4 * 8 + (attention + ffn),
            "ffn": 4 * (attention + 8) + ffn, "attn": 4 * (8 + ffn) + attention}
    for choice, per_token in want.items():
        assert activation_bytes(cfg, 100, choice) == 100 * (per_token * 4 + output), choice
    assert activation_bytes(cfg, 100, "none", dtype_bytes=2) == 100 * (want["none"] * 2 + (2 * 8 + 10) * 2 + 10 * 4)
    # a forward alone holds no recomputed block
    assert activation_bytes(cfg, 100, "full", forward_only=True) == 100 * (4 * 8 * 4 + output)
    # every second block checkpointed: blocks 0 and 2, as parallel/activation.py chooses them
    assert activation_bytes(cfg, 100, "full", every=2) == 100 * ((2 * (attention + ffn) + 2 * 8 + attention + ffn)
                                                                 * 4 + output)
    # a competition step adds 4E + K d per token per MoE layer and one chunk of experts' outputs (fp32)
    chunk = 100 * (16 + 8) * 4 * 4
    compete = 4 * 4 + 2 * 8
    assert activation_bytes(cfg, 100, "none", compete=True) == 100 * ((want["none"] + 4 * compete) * 4
                                                                      + output) + chunk
    # expert parallelism: the token exchange keeps the group's tokens (ep d per token), the weight
    # exchange all experts' weights (E (d h + h d) per layer)
    assert activation_bytes(cfg, 100, "none", compete=True, ep=2) == 100 * ((want["none"] + 4 * (compete + 2 * 8))
                                                                            * 4 + output) + chunk
    assert activation_bytes(cfg, 100, "none", compete=True, ep=2, exchange="weights") == \
        100 * ((want["none"] + 4 * compete) * 4 + output) + chunk + 4 * 4 * (8 * 16 + 16 * 8) * 4
    # a step in which only `competing` MoE layers compete (the schedule's cap, competition.a_max)
    assert activation_bytes(cfg, 100, "none", compete=True, competing=1) == 100 * ((want["none"] + compete) * 4
                                                                                   + output) + chunk
    # without competition neither the ep size nor the exchange changes anything
    assert activation_bytes(cfg, 100, "none", ep=4, exchange="weights") == activation_bytes(cfg, 100, "none")


@pytest.mark.parametrize("activation,kept", [("relu", 16), ("gelu", 32), ("silu", 32), ("swiglu", 64)])
def test_hidden_layer_kept_per_activation_by_hand(activation, kept):
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, activation=activation))
    per_token = 2 * 8 + 7 * 8 + 2 * 8 + 2 * (2 * 8 + kept) + 3 * 4
    assert activation_bytes(cfg, 10, "none") == 10 * (per_token * 4 + (2 * 8 + 10) * 4 + 10 * 4)


def saved_for_backward(model, tokens, compete: bool) -> int:
    """Bytes of the distinct storages autograd keeps for one forward and loss, parameters
    excluded: counted by torch's saved-tensor hooks, independently of the memory model."""
    import torch

    from competesmoe.model.transformer import lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.dtype.is_floating_point and storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens[:, :-1], [compete] * len(model.moe_layers))
        lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("compete", [False, True])
def test_activation_bytes_match_what_autograd_keeps(activation, compete):
    """The model's activations (the logits and its recomputed chunk aside) are the floating-point
    tensors autograd saves for the backward, within the per-row norm statistics it leaves out."""
    import torch

    from competesmoe.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, moe_every=2,
                      moe=MoEConfig(router="competesmoe", num_experts=8, top_k=2, expert_hidden=96,
                                    activation=activation))
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    tokens = torch.randint(0, 256, (4, 65))
    # the logits are held by the training step (its `out`), not saved by autograd
    want = activation_bytes(cfg, 256, "none", compete=compete) - 256 * 256 * 4
    if compete:
        per_expert = 256 * (cfg.moe.expert_hidden * (2 if activation == "swiglu" else 1) + 64) * 4
        want -= per_expert * 8  # the recomputed chunk is transient: autograd keeps none of it
    got = saved_for_backward(model, tokens, compete)
    assert abs(got - want) / want < 0.03, (got, want)
