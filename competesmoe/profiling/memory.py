"""A written model of a rank's training memory, to hold measurements against and to plan layouts.

Bytes per rank, with P_d the dense parameters, P_e the expert parameters of the whole model, ep
the expert-parallel size, world the ranks, dp = world (data parallelism of the dense weights) and
edp = world / ep (of each expert shard); the rank holds P = P_d + P_e / ep parameters.

  weights      4 P                     fp32 parameters (bf16 autocast on a GPU keeps fp32 weights)
  gradients    4 P                     ZeRO-0 and ZeRO-1 (full fp32 gradients on every rank)
               4 (P_d / dp + P_e / ep / edp) + buckets       ZeRO-2 (partitioned)
  optimizer    8 P                     ZeRO-0: torch AdamW's exp_avg and exp_avg_sq
               12 (P_d / dp + P_e / ep / edp)                ZeRO-1/2: DeepSpeed's fp32 partition
                                                             copy (4) and Adam's two moments (8)

Activations: what autograd keeps, per token of a micro-batch, in elements (times the activation
dtype's bytes: 4 in fp32, ~2 under bf16 autocast), per layer, counted from the block's code
(d model width, i = heads x head_dim, K experts per token, h1 the first expert matrix's columns,
h its hidden width, E experts):
  attention  2d + 7i   norm input and output, q k v, rotated q k, attention output, its reshape
  MoE FFN    2d + K (3d + h1 + h) + 3E    norm input and output; per (token, slot) the gathered
             input, expert hidden before and after the activation, expert output and its weighted
             copy; router logits, probabilities and the balance loss's
  a competing MoE layer adds the scores s [T, E] and their three softmax/mean relatives (4E), and
  while one chunk of experts is recomputed at most TorchBackend.score_chunk_bytes (256 MiB).
Checkpointing keeps for a recomputed part only its input (d per token), and during the backward
one layer's recomputed activations are alive again:
  none  L (A + F)           full  L d + (A + F)
  attn  L (d + F) + A       ffn   L (A + d) + F
(A attention, F the MoE FFN per token). The output layer adds 2 V per token (logits and their
float softmax). The model ignores what does not grow with the model: the runtime and allocator
(measured growth is taken from a baseline after start-up), and transient buffers of collectives.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from competesmoe.kernels.spec import w1_columns
from competesmoe.model.config import ModelConfig

CHECKPOINTING = ("none", "full", "ffn", "attn")
SCORE_CHUNK_BYTES = 256 * 2**20  # TorchBackend's default (model/moe/experts.py)
GB = 1e9


@dataclass
class ParamCounts:
    dense: int  # every parameter that is not an expert's (replicated on every rank)
    experts: int  # all experts of all MoE layers (sharded over the expert-parallel group)

    @property
    def total(self) -> int:
        return self.dense + self.experts


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Counted on the meta device from the model's own module tree (no memory, any size)."""
    from competesmoe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return ParamCounts(dense=sum(p.numel() for p in model.parameters()) - experts, experts=experts)


@dataclass
class Layout:
    world: int = 1
    ep: int = 1
    zero_stage: int = 0

    @property
    def edp(self) -> int:
        return self.world // self.ep


def state_bytes(counts: ParamCounts, layout: Layout) -> dict[str, float]:
    """Weights, gradients and optimizer state of one rank (bytes), as in the module docstring."""
    own = counts.dense + counts.experts / layout.ep
    partition = counts.dense / layout.world + counts.experts / layout.ep / layout.edp
    weights = 4 * own
    if layout.zero_stage == 0:
        return {"weights": weights, "gradients": 4 * own, "optimizer": 8 * own}
    grads = 4 * own if layout.zero_stage == 1 else 4 * partition
    return {"weights": weights, "gradients": grads, "optimizer": 12 * partition}


def _per_token(cfg: ModelConfig) -> tuple[float, float, float]:
    """(attention, MoE FFN, dense FFN) elements kept per token per layer (module docstring)."""
    d, moe = cfg.d_model, cfg.moe
    inner = cfg.n_heads * cfg.attn_head_dim
    h1 = w1_columns(moe.expert_hidden, moe.activation)
    attention = 2 * d + 7 * inner
    moe_ffn = 2 * d + moe.top_k * (3 * d + h1 + moe.expert_hidden) + 3 * moe.num_experts
    dense_h = moe.top_k * moe.expert_hidden
    dense_ffn = 2 * d + w1_columns(dense_h, moe.activation) + dense_h + d
    return attention, moe_ffn, dense_ffn


def activation_bytes(cfg: ModelConfig, tokens: int, checkpointing: str = "none", compete: bool = False,
                     dtype_bytes: float = 4.0, every: int = 1) -> float:
    """Peak bytes autograd holds for one micro-batch of `tokens` tokens (module docstring);
    `every`: only every k-th block is checkpointed."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    attention, moe_ffn, dense_ffn = _per_token(cfg)
    d, E = cfg.d_model, cfg.moe.num_experts
    kept, recompute = 0.0, 0.0
    for layer in range(cfg.n_layers):
        ffn = moe_ffn if cfg.is_moe_layer(layer) else dense_ffn
        if compete and cfg.is_moe_layer(layer):
            ffn += 4 * E
        choice = checkpointing if layer % every == 0 else "none"  # blocks 0, k, 2k, ... (parallel/activation.py)
        parts = {"none": (attention + ffn, 0.0), "full": (d, attention + ffn),
                 "attn": (d + ffn, attention), "ffn": (attention + d, ffn)}[choice]
        kept += parts[0]
        recompute = max(recompute, parts[1])
    per_token = kept + recompute + 2 * cfg.vocab_size
    chunk = 0.0
    if compete:  # one chunk of experts' outputs, recomputed in the backward (bounded by the backend)
        per_expert = tokens * (w1_columns(cfg.moe.expert_hidden, cfg.moe.activation) + d) * 4
        chunk = min(SCORE_CHUNK_BYTES, per_expert * E)
    return tokens * per_token * dtype_bytes + chunk


def predict(cfg: ModelConfig, layout: Layout, tokens: int, checkpointing: str = "none", compete: bool = False,
            dtype_bytes: float = 4.0, counts: Optional[ParamCounts] = None) -> dict[str, float]:
    """Every term (bytes) of one rank's training memory, and their sum `total`."""
    counts = counts or param_counts(cfg)
    out = state_bytes(counts, layout)
    out["activations"] = activation_bytes(cfg, tokens, checkpointing, compete, dtype_bytes)
    out["total"] = sum(out.values())
    return out


def checkpoint_save_bytes(counts: ParamCounts, layout: Layout, rank: int = 0) -> float:
    """Bytes a rank writes: its weights and Adam moments (12 per parameter) of what it owns:
    rank 0 the dense tensors, ranks of the first expert-parallel group their expert slice."""
    owned = (counts.dense if rank == 0 else 0) + (counts.experts / layout.ep if rank < layout.ep else 0)
    return 12 * owned


# ---- what fits --------------------------------------------------------------------------------------

def olmoe_like() -> ModelConfig:
    """OLMoE-1B-7B's shape: d 2048, 16 layers, 16 heads of 128, 64 experts of 1024 (SwiGLU), top-8."""
    from competesmoe.model.config import MoEConfig

    return ModelConfig(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, rope_fraction=1.0, norm="rmsnorm",
                       moe=MoEConfig(router="competesmoe", num_experts=64, top_k=8, expert_hidden=1024,
                                     activation="swiglu"))


def mixtral_like() -> ModelConfig:
    """Mixtral-8x7B's shape: d 4096, 32 layers, 32 heads of 128 (full multi-head attention here: our
    attention has no grouped keys/values, +1.6B parameters), 8 experts of 14336 (SwiGLU), top-2."""
    from competesmoe.model.config import MoEConfig

    return ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, rope_fraction=1.0, norm="rmsnorm",
                       moe=MoEConfig(router="competesmoe", num_experts=8, top_k=2, expert_hidden=14336,
                                     activation="swiglu"))


@dataclass
class Fit:
    model: str
    gpus: int
    ep: int
    zero_stage: int
    checkpointing: str
    micro_batch: int  # sequences per forward (0: the state alone does not fit)
    seq_len: int
    state_gb: float
    activations_gb: float
    total_gb: float


def best_fit(name: str, cfg: ModelConfig, seq_len: int, gpus: int, checkpointing: str, gpu_gb: float = 80.0,
             reserve_gb: float = 6.0, zero_stage: int = 2, compete: bool = True, max_micro: int = 64) -> Fit:
    """For one checkpointing choice, the EP size (dividing both the experts and the GPUs) that fits
    the largest micro-batch per GPU, the smallest EP size among equals; bf16 activations,
    competition steps counted. Where nothing fits, the layout with the least memory (micro-batch
    0). `reserve_gb` is kept for the CUDA context, allocator fragmentation and collective buffers."""
    counts = param_counts(cfg)
    budget = (gpu_gb - reserve_gb) * GB
    best: Optional[Fit] = None
    for ep in [e for e in range(1, gpus + 1) if gpus % e == 0 and cfg.moe.num_experts % e == 0]:
        state = sum(state_bytes(counts, Layout(gpus, ep, zero_stage)).values())

        def act(micro: int) -> float:
            return activation_bytes(cfg, micro * seq_len, checkpointing, compete, 2.0)

        micro = 0
        while micro < max_micro and state + act(micro + 1) <= budget:
            micro += 1
        shown = act(max(micro, 1))
        fit = Fit(name, gpus, ep, zero_stage, checkpointing, micro, seq_len, state / GB, shown / GB,
                  (state + shown) / GB)
        if best is None or (fit.micro_batch, -fit.total_gb * (fit.micro_batch == 0)) > \
                (best.micro_batch, -best.total_gb * (best.micro_batch == 0)):
            best = fit
    return best


def reference_model() -> tuple[ModelConfig, int]:
    """configs/reference_lm.yaml's model (vocabulary from its data section) and sequence length."""
    from pathlib import Path

    from competesmoe.config import load_config

    reference = load_config(Path(__file__).resolve().parents[2] / "configs" / "reference_lm.yaml")
    return dataclasses.replace(reference.model, vocab_size=reference.data.vocab_size), reference.train.seq_len


def fits_table(gpu_counts=(8, 64), gpu_gb: float = 80.0) -> list[Fit]:
    """Per model, GPU count and checkpointing choice, the best layout (best_fit)."""
    ref_model, ref_seq = reference_model()
    models = [("reference_lm (154M)", ref_model, ref_seq),
              ("OLMoE-1B-7B-like", olmoe_like(), 4096), ("Mixtral-8x7B-like", mixtral_like(), 4096)]
    return [best_fit(name, cfg, seq, gpus, ckpt, gpu_gb)
            for name, cfg, seq in models for gpus in gpu_counts for ckpt in CHECKPOINTING]


MEMORY_MODEL_SUMMARY = "The memory model (competesmoe/profiling/memory.py):\n\n```\n" + __doc__.strip() + "\n```"
