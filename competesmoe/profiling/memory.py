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
dtype's bytes: 4 in fp32, ~2 under bf16 autocast), per layer, counted from the block's code and
checked against autograd's saved tensors (tests/test_memory_model.py) (d model width, i = heads x
head_dim, K experts per token, h the experts' hidden width, E experts; k(h) the hidden layer's
kept elements: h for relu, whose saved output is also the second matmul's input, 2h for gelu and
silu, input and output, 4h for swiglu, gate and up, silu(gate) and their product):
  attention  2d + 7i         norm input and output, q k v, rotated q k, attention output, its reshape
  MoE FFN    2d + K (2d + k(h)) + 3E    norm input and output; per (token, slot) the gathered
             input, the hidden layer, the combined output (kept for the routing weights'
             gradient; the expert outputs themselves are put back in token order by a permutation
             that keeps only its indices); router logits, probabilities and the balance loss's
  dense FFN  2d + k(K h)     norm input and output, the hidden layer
A competing MoE layer adds the scores s [T, E] and their three softmax/mean relatives (4E), the
diversity loss's unit-normalised winner outputs (K d); under expert parallelism with the token
exchange the group's gathered tokens (ep d: the chunked scoring recomputes from them), with the
weight exchange all E experts' gathered weights per layer, E (d h1 + h d) elements (h1 = h, 2h for
swiglu); and while one chunk of experts is recomputed at most TorchBackend.score_chunk_bytes
(256 MiB, fp32).
Checkpointing keeps for a recomputed part only its input (d per token), and during the backward
one layer's recomputed activations are alive again:
  none  L (A + F)           full  L d + (A + F)
  attn  L (d + F) + A       ffn   L (A + d) + F
(A attention, F the FFN per token). The output adds the final norm's input and output (2d), the
logits (V: the training step holds them until its backward, autograd does not need them) and
the loss's log-probabilities, V in fp32 whatever the activation dtype. Under expert parallelism a
rank's experts receive T K rows on average; the rank that receives most holds more (measured
1.12x on a competing step of 64 experts at ep 2, the winners not being balanced). The model
ignores what does not grow with the model: the runtime and allocator (measured growth is taken
from a baseline after start-up), index vectors, and transient buffers of collectives.
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


def _kept_hidden(hidden: int, activation: str) -> int:
    """Elements autograd keeps per row of an MLP's hidden layer: relu its output only (its saved
    result is also the second matmul's input); gelu and silu their input and output; swiglu the
    first matmul's output (gate and up, 2h), silu(gate) and the product."""
    return {"relu": hidden, "gelu": 2 * hidden, "silu": 2 * hidden, "swiglu": 4 * hidden}[activation]


def _per_token(cfg: ModelConfig) -> tuple[float, float, float]:
    """(attention, MoE FFN, dense FFN) elements kept per token per layer (module docstring)."""
    d, moe = cfg.d_model, cfg.moe
    inner = cfg.n_heads * cfg.attn_head_dim
    attention = 2 * d + 7 * inner
    moe_ffn = 2 * d + moe.top_k * (2 * d + _kept_hidden(moe.expert_hidden, moe.activation)) + 3 * moe.num_experts
    dense_ffn = 2 * d + _kept_hidden(moe.top_k * moe.expert_hidden, moe.activation)
    return attention, moe_ffn, dense_ffn


def activation_bytes(cfg: ModelConfig, tokens: int, checkpointing: str = "none", compete: bool = False,
                     dtype_bytes: float = 4.0, every: int = 1, ep: int = 1, exchange: str = "tokens",
                     competing: Optional[int] = None, forward_only: bool = False) -> float:
    """Peak bytes autograd holds for one micro-batch of `tokens` tokens (module docstring);
    `every`: only every k-th block is checkpointed; `ep` and `exchange` (tokens or weights): how
    a competing layer meets the experts of other ranks; `competing`: how many MoE layers compete
    when `compete` (all by default; the schedule lets at most competition.a_max per step);
    `forward_only`: what the forward and the loss hold, without the part a checkpointed
    backward recomputes."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    if exchange not in ("tokens", "weights"):
        raise ValueError(f"exchange must be tokens or weights, got {exchange!r}")
    attention, moe_ffn, dense_ffn = _per_token(cfg)
    d, moe = cfg.d_model, cfg.moe
    h1 = w1_columns(moe.expert_hidden, moe.activation)
    compete_ffn, gathered = 0.0, 0.0
    if compete:
        compete_ffn = 4 * moe.num_experts + moe.top_k * d + (ep * d if ep > 1 and exchange == "tokens" else 0)
        if ep > 1 and exchange == "weights":
            gathered = moe.num_experts * (d * h1 + moe.expert_hidden * d) * dtype_bytes
    kept, recompute = 0.0, 0.0
    left = cfg.n_layers if competing is None else competing  # competing layers still to place
    for layer in range(cfg.n_layers):
        if cfg.is_moe_layer(layer):
            ffn = tokens * moe_ffn * dtype_bytes
            if left > 0:
                ffn += tokens * compete_ffn * dtype_bytes + gathered
                left -= 1
        else:
            ffn = tokens * dense_ffn * dtype_bytes
        attn, block_input = tokens * attention * dtype_bytes, tokens * d * dtype_bytes
        choice = checkpointing if layer % every == 0 else "none"  # blocks 0, k, 2k, ... (parallel/activation.py)
        parts = {"none": (attn + ffn, 0.0), "full": (block_input, attn + ffn),
                 "attn": (block_input + ffn, attn), "ffn": (attn + block_input, ffn)}[choice]
        kept += parts[0]
        recompute = max(recompute, parts[1])
    # the final norm's input and output, the logits (held by the training step through the
    # backward) and the loss's fp32 log-probabilities
    output = tokens * ((2 * d + cfg.vocab_size) * dtype_bytes + cfg.vocab_size * 4)
    chunk = 0.0
    if compete:  # one chunk of experts' outputs, recomputed in the backward (bounded by the backend)
        per_expert = tokens * (h1 + d) * 4
        chunk = min(SCORE_CHUNK_BYTES, per_expert * moe.num_experts)
    return kept + (0.0 if forward_only else recompute) + output + chunk


def exchange_for(cfg: ModelConfig, tokens: float, ep: int, dtype_bytes: float = 4.0, policy=None) -> str:
    """The exchange a competing layer of `tokens` tokens per rank takes under expert parallelism:
    parallel.competition_exchange's policy (competesmoe/parallel/exchange.py), `auto` by default."""
    if ep == 1:
        return "tokens"
    from competesmoe.parallel.exchange import ExchangePolicy, ExchangeShape

    moe = cfg.moe
    shape = ExchangeShape(tokens=tokens, d_model=cfg.d_model, num_experts=moe.num_experts, top_k=moe.top_k,
                          w1_cols=w1_columns(moe.expert_hidden, moe.activation), hidden=moe.expert_hidden, ep=ep,
                          act_itemsize=dtype_bytes, weight_itemsize=dtype_bytes, grad_itemsize=4)
    return (policy or ExchangePolicy()).choose(shape)


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
    the largest micro-batch per GPU, the smallest EP size among equals; bf16 activations, a
    competition step counted (competition.a_max competing layers, with the exchange `auto`
    takes). Where nothing fits, the layout with the least memory (micro-batch 0). `reserve_gb`
    is kept for the CUDA context, allocator fragmentation and collective buffers."""
    counts = param_counts(cfg)
    budget = (gpu_gb - reserve_gb) * GB
    best: Optional[Fit] = None
    for ep in [e for e in range(1, gpus + 1) if gpus % e == 0 and cfg.moe.num_experts % e == 0]:
        state = sum(state_bytes(counts, Layout(gpus, ep, zero_stage)).values())

        def act(micro: int, ep: int = ep) -> float:
            tokens = micro * seq_len
            return activation_bytes(cfg, tokens, checkpointing, compete, 2.0, ep=ep,
                                    exchange=exchange_for(cfg, tokens, ep, 2.0),
                                    competing=cfg.moe.competition.a_max)

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
