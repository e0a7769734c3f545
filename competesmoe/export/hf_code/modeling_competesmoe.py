"""A competesmoe language model for Hugging Face transformers (shipped with every HF export).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

This file needs torch and transformers only (not competesmoe). It is the inference side of
competesmoe's Transformer: a pre-norm decoder (LayerNorm with weight and bias, or RMSNorm), fused qkv
attention without bias, RoPE on the first `rope_dims` dimensions of each head (rotate-half
pairing), and in every `moe_every`-th layer a dropless MoE feed-forward layer of bias-free expert
MLPs act(x W1) W2 (the other layers: one dense MLP of width top_k * expert_hidden). Tokens are
routed by the router of the configured kind, as competesmoe does at evaluation (CompeteSMoE
routes with its router there too; competition is a training-time step):
  softmax:  top-K of softmax(x Wg^T), renormalised            (smoe, competesmoe, sharede_v2)
  sigmoid:  top-K of sigmoid(x Wg^T), renormalised            (sigmoid, sharede_v3)
  xmoe:     top-K of softmax(cos(x P^T, expert embeddings at norm r) / temperature), renormalised
sharede_v2/v3 add always-on shared experts with weight 1 (held as one MLP). Parameter names are
competesmoe's, so its checkpoints load without renaming. Routing math runs in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class CompeteSMoEConfig(PretrainedConfig):
    model_type = "competesmoe"

    def __init__(self, vocab_size=8000, hidden_size=512, num_hidden_layers=16, num_attention_heads=4,
                 head_dim=128, rope_dims=64, rope_theta=10000.0, norm="layernorm", layer_norm_eps=1e-5, moe_every=1,
                 router="smoe", num_experts=64, num_experts_per_tok=8, expert_hidden=128,
                 activation="relu", num_shared_experts=0, xmoe_dim=32, xmoe_temperature=0.3,
                 xmoe_embedding_norm=1.5, max_position_embeddings=2048, tie_word_embeddings=False,
                 initializer_range=0.02, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.head_dim = head_dim
        self.num_key_value_heads = num_attention_heads
        self.rope_dims, self.rope_theta, self.norm, self.layer_norm_eps = rope_dims, rope_theta, norm, layer_norm_eps
        self.moe_every, self.router, self.num_experts = moe_every, router, num_experts
        self.num_experts_per_tok, self.expert_hidden, self.activation = num_experts_per_tok, expert_hidden, activation
        self.num_shared_experts = num_shared_experts
        self.xmoe_dim, self.xmoe_temperature, self.xmoe_embedding_norm = xmoe_dim, xmoe_temperature, xmoe_embedding_norm
        self.max_position_embeddings, self.initializer_range = max_position_embeddings, initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def is_moe_layer(self, layer: int) -> bool:
        return self.router != "dense" and layer % self.moe_every == self.moe_every - 1


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def activate(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](h)


def rotate(x, positions, dims, theta):
    """RoPE on the first `dims` dims of x [B, H, N, head_dim] at positions [B or 1, N]."""
    if dims == 0:
        return x
    inv_freq = theta ** (-torch.arange(0, dims, 2, dtype=torch.float32, device=x.device) / dims)
    angles = (positions.float()[..., None] * inv_freq)[:, None]  # [B, 1, N, dims / 2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rot, rest = x[..., :dims], x[..., dims:]
    a, b = rot.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        self.layer, self.config = layer, config
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * self.n_heads * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, positions, mask, cache):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = rotate(q, positions, self.config.rope_dims, self.config.rope_theta)
        k = rotate(k, positions, self.config.rope_dims, self.config.rope_theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        if mask is None:  # plain causal attention (or one query, which sees every key)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, d, hidden, activation):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d, 2 * hidden if activation == "swiglu" else hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(activate(self.w1(x), self.activation))


class LinearRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.scoring = "sigmoid" if config.router in ("sigmoid", "sharede_v3") else "softmax"
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x):  # x [T, d] -> scores [T, E] in float32
        logits = F.linear(x.float(), self.weight.float())
        return logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()


class XMoERouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.temperature, self.norm = config.xmoe_temperature, config.xmoe_embedding_norm
        self.proj = nn.Parameter(torch.empty(config.xmoe_dim, config.hidden_size))
        self.expert_embeddings = nn.Parameter(torch.empty(config.num_experts, config.xmoe_dim))

    def forward(self, x):
        embeddings = self.expert_embeddings.float()
        embeddings = embeddings * (self.norm / embeddings.norm(dim=-1, keepdim=True))
        projected = F.normalize(F.linear(x.float(), self.proj.float()), dim=-1, eps=1e-4)
        return (projected @ embeddings.t() / self.temperature).softmax(-1)


class Experts(nn.Module):
    def __init__(self, config):
        super().__init__()
        columns = 2 * config.expert_hidden if config.activation == "swiglu" else config.expert_hidden
        self.w1 = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, columns))
        self.w2 = nn.Parameter(torch.empty(config.num_experts, config.expert_hidden, config.hidden_size))


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.activation = config.num_experts_per_tok, config.activation
        self.router = XMoERouter(config) if config.router == "xmoe" else LinearRouter(config)
        self.experts = Experts(config)
        self.shared = None
        if config.router.startswith("sharede"):
            self.shared = FeedForward(config.hidden_size, config.num_shared_experts * config.expert_hidden,
                                      config.activation)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        top, indices = self.router(tokens).topk(self.top_k, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        out = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
        for expert in indices.unique().tolist():
            token, slot = (indices == expert).nonzero(as_tuple=True)
            hidden = activate(tokens[token] @ self.experts.w1[expert], self.activation)
            out.index_add_(0, token, weights[token, slot, None] * (hidden @ self.experts.w2[expert]))
        out = out.to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.view(x.shape)


class Block(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        d = config.hidden_size
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.ffn_norm = make_norm(config)
        if config.is_moe_layer(layer):
            self.ffn = MoE(config)
        else:
            self.ffn = FeedForward(d, config.num_experts_per_tok * config.expert_hidden, config.activation)

    def forward(self, x, positions, mask, cache):
        x = x + self.attn(self.attn_norm(x), positions, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


def attention_mask_4d(attention_mask, past: int, n: int, device):
    """Which keys each of n queries after `past` cached positions may see, [B or 1, 1, n, past + n],
    from a 2D padding mask (1 = token) over all positions; a padding position sees itself only,
    so that no row is empty. None when plain causal attention is right."""
    total = past + n
    padded = attention_mask is not None and not bool(attention_mask[:, :total].all())
    if not padded and (past == 0 or n == 1):
        return None
    query = torch.arange(past, total, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    allowed = key <= query
    if padded:
        allowed = allowed & (attention_mask[:, None, :total].bool().to(device) | (key == query))
    return allowed.view(-1, 1, n, total)


class CompeteSMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CompeteSMoEConfig
    base_model_prefix = "competesmoe"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (Experts, LinearRouter, XMoERouter)):
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=std)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        n = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=x.device)[None]
        mask = attention_mask_4d(attention_mask, past, n, x.device)
        for block in self.blocks:
            x = block(x, position_ids, mask, cache)
        x = self.norm(x)
        logits = self.head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        # transformers renamed the output's past_key_values to cache (5.x); fill whichever exists
        name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{name: cache if use_cache else None})
