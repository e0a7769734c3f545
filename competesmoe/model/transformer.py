"""A decoder-only pre-LN transformer LM with MoE feed-forward layers.

The model knows nothing about parallelism: competesmoe.parallel applies expert parallelism to a
built model by swapping each MoE layer's dispatcher and slicing its experts.

    model = Transformer(cfg)
    out = model(tokens, compete=[False, True, ...])   # one flag per MoE layer, or None
    loss = lm_loss(out.logits, targets) + out.aux_loss

Incremental decoding (generation) passes a KVCache: each forward then reads the new tokens only,
at positions after those already cached (competesmoe.model.generate has the sampling loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from competesmoe.model.config import ModelConfig
from competesmoe.model.init import Stream, global_stream, normal_
from competesmoe.model.kv_cache import KVCache, LayerCache
from competesmoe.model.moe.experts import expert_flops_per_token, init_std_out
from competesmoe.model.moe.layer import FeedForward, MoELayer, MoEStats


@dataclass
class ModelOutput:
    logits: Tensor  # [B, N, vocab]
    aux_loss: Tensor  # sum of the MoE layers' weighted auxiliary losses (scalar)
    moe_stats: list[MoEStats]  # one per MoE layer, in order


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class RotaryEmbedding(nn.Module):
    """RoPE on the first `dims` dimensions of each head (rotate-half pairing); the rest pass."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims, self.base = dims, base
        self.register_buffer("inv_freq", torch.empty(dims // 2), persistent=False)
        self.init_parameters(global_stream)

    def init_parameters(self, stream: Stream) -> None:
        """No weights; the frequencies are recomputed (a model materialised from the meta device
        has none yet)."""
        if not self.inv_freq.is_meta:
            self.inv_freq.copy_(self.base ** (-torch.arange(0, self.dims, 2, dtype=torch.float32) / max(self.dims, 1)))

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:  # x: [B, H, N, head_dim] at positions offset..
        if self.dims == 0:
            return x
        pos = torch.arange(offset, offset + x.shape[2], device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rot, rest = x[..., :self.dims], x[..., self.dims:]
        a, b = rot.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.attn_head_dim
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(cfg.rope_dims, cfg.rope_base)
        self.out_init_std = init_std_out(inner, cfg.n_layers)
        self.init_parameters(global_stream)

    def init_parameters(self, stream: Stream) -> None:
        normal_(self.qkv.weight, self.qkv.in_features ** -0.5, stream("qkv.weight"))
        normal_(self.out.weight, self.out_init_std, stream("out.weight"))

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, mask: Optional[Tensor] = None) -> Tensor:
        """Without a cache: causal attention over x. With one: x holds the positions after the
        cached ones, which it attends to as well; `mask` is KVCache.mask's."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = cache.length if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # causal, or one query after the cache (it sees every key)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=offset == 0 and n > 1)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        moe = cfg.moe
        if cfg.is_moe_layer(layer) and moe.router != "dense":
            self.ffn = MoELayer(moe, cfg.d_model, cfg.router_init, cfg.n_layers)
        else:
            hidden = moe.top_k * moe.expert_hidden
            self.ffn = FeedForward(cfg.d_model, hidden, moe.activation, init_std_out(hidden, cfg.n_layers))

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: Tensor, compete: bool, cache: Optional[LayerCache] = None,
                mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[MoEStats]]:
        x = x + self.attn(self.attn_norm(x), cache, mask)
        y, aux, stats = self.ffn(self.ffn_norm(x), compete)
        return x + y, aux, stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate("model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_parameters(global_stream)

    def init_parameters(self, stream: Stream) -> None:
        """The embedding and the output head; every block initialises its own weights
        (model/init.py)."""
        normal_(self.embed.weight, self.cfg.embed_init_std, stream("embed.weight"))
        if not self.cfg.tie_embeddings:
            normal_(self.head.weight, self.cfg.d_model ** -0.5, stream("head.weight"))

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, tokens: Tensor, compete: Optional[Sequence[bool]] = None,
                cache: Optional[KVCache] = None) -> ModelOutput:
        """`compete[i]` asks the i-th MoE layer for a competition step (training mode only).
        With a `cache`, `tokens` are the positions after the cached ones, and are cached in turn."""
        n_moe = len(self.moe_layers)
        if compete is not None and len(compete) != n_moe:
            raise ValueError(f"compete has {len(compete)} flags for {n_moe} MoE layers")
        mask = cache.mask(tokens.shape[1], tokens.device) if cache is not None else None
        x = self.embed(tokens)
        aux_total = x.new_zeros((), dtype=torch.float32)
        stats: list[MoEStats] = []
        moe_index = 0
        for i, block in enumerate(self.blocks):
            flag = bool(compete[moe_index]) if (compete is not None and block.is_moe) else False
            x, aux, layer_stats = block(x, flag, cache.layers[i] if cache is not None else None, mask)
            if block.is_moe:
                aux_total = aux_total + aux
                stats.append(layer_stats)
                moe_index += 1
        return ModelOutput(self.head(self.norm(x)), aux_total, stats)

    def param_counts(self) -> dict[str, int]:
        """Total and active (used per token) parameters of the whole model, counted from the
        config's expert counts so that an expert-parallel shard reports the full model too."""
        expert_tensors = {id(t) for layer in self.moe_layers for t in (layer.experts.w1, layer.experts.w2)}
        dense = sum(p.numel() for p in self.parameters() if id(p) not in expert_tensors)
        per_expert = sum((layer.experts.w1.numel() + layer.experts.w2.numel()) // layer.experts.num_experts
                         for layer in self.moe_layers)
        moe = self.cfg.moe
        return {"total": dense + per_expert * moe.num_experts, "active": dense + per_expert * moe.top_k}

    def flops_per_token(self, seq_len: int) -> float:
        """Training matmul FLOPs per token (forward + backward = 3x forward) of the active
        parameters plus causal attention scores, without competition (counted separately)."""
        cfg = self.cfg
        inner = cfg.n_heads * cfg.attn_head_dim
        per_layer = 2 * (4 * cfg.d_model * inner) + 2 * 2 * inner * seq_len / 2  # projections + causal QK^T, AV
        ffn = 0.0
        for block in self.blocks:
            if block.is_moe:
                ffn += cfg.moe.top_k * expert_flops_per_token(cfg.d_model, cfg.moe.expert_hidden, cfg.moe.activation)
                ffn += 2 * cfg.d_model * cfg.moe.num_experts  # router
                if block.ffn.shared is not None:
                    ffn += cfg.moe.num_shared_experts * expert_flops_per_token(cfg.d_model, cfg.moe.expert_hidden,
                                                                               cfg.moe.activation)
            else:
                ffn += cfg.moe.top_k * expert_flops_per_token(cfg.d_model, cfg.moe.expert_hidden, cfg.moe.activation)
        forward = cfg.n_layers * per_layer + ffn + 2 * cfg.d_model * cfg.vocab_size
        return 3.0 * forward
