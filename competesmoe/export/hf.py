"""Export a checkpoint as a Hugging Face model directory.

Two formats (`competesmoe-ckpt export RUN OUT --format hf|hf-native`):

hf          Every configuration. config.json + model.safetensors + our modeling code
            (modeling_competesmoe.py, torch and transformers only; `auto_map` registers it), so
            `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it. The
            parameter names are ours.
hf-native   Configurations that a transformers architecture computes exactly, loaded without
            remote code. Today that is the `dense` router (a dense pre-LN transformer) with a
            relu/gelu/silu activation and head_dim = d_model / n_heads: GPT-NeoX with sequential
            residuals, no attention bias and zero MLP biases. The MoE routers have no native
            equivalent: every MoE architecture transformers ships normalises with RMSNorm
            (Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V2/V3, GLM-4-MoE, ...) where we use LayerNorm
            with a bias, and the ones with LayerNorm route differently (PhiMoE's sparsemixer) or
            have no norm bias (DBRX); our partial RoPE and shared experts narrow it further.

Both write the tokenizer as tokenizer.json (competesmoe.export.hf_tokenizer: the same ids as our
sentencepiece model), generation_config.json (EOS, greedy) and set max_position_embeddings to the
trained sequence length, which lm-eval uses as its window.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from competesmoe.errors import CompeteSMoEError
from competesmoe.model.config import ModelConfig

CODE = Path(__file__).parent / "hf_code" / "modeling_competesmoe.py"
FORMATS = ("hf", "hf-native")
NATIVE_ACTIVATIONS = ("relu", "gelu", "silu")


def remote_code_config(cfg: ModelConfig) -> dict:
    """config.json fields of CompeteSMoEConfig (modeling_competesmoe.py)."""
    moe = cfg.moe
    return {
        "architectures": ["CompeteSMoEForCausalLM"], "model_type": "competesmoe",
        "auto_map": {"AutoConfig": "modeling_competesmoe.CompeteSMoEConfig",
                     "AutoModelForCausalLM": "modeling_competesmoe.CompeteSMoEForCausalLM"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "head_dim": cfg.attn_head_dim, "rope_dims": cfg.rope_dims,
        "rope_theta": cfg.rope_base, "layer_norm_eps": cfg.norm_eps, "moe_every": cfg.moe_every,
        "router": moe.router, "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "expert_hidden": moe.expert_hidden, "activation": moe.activation,
        "num_shared_experts": moe.num_shared_experts if moe.router.startswith("sharede") else 0,
        "xmoe_dim": moe.routing_dim, "xmoe_temperature": moe.xmoe_temperature,
        "xmoe_embedding_norm": moe.xmoe_embedding_norm, "tie_word_embeddings": cfg.tie_embeddings,
    }


def native_mismatch(cfg: ModelConfig) -> Optional[str]:
    """Why `cfg` has no exact native transformers architecture, or None when GPT-NeoX computes it."""
    if cfg.moe.router != "dense":
        return (f"router '{cfg.moe.router}' has MoE layers, and no MoE architecture in transformers "
                "computes ours exactly (they use RMSNorm, we use LayerNorm with a bias); use --format hf")
    if cfg.moe.activation not in NATIVE_ACTIVATIONS:
        return f"activation '{cfg.moe.activation}' is gated; GPT-NeoX's MLP is not; use --format hf"
    if cfg.attn_head_dim * cfg.n_heads != cfg.d_model:
        return "head_dim * n_heads != d_model, which GPT-NeoX cannot express; use --format hf"
    if int(cfg.attn_head_dim * (cfg.rope_dims / cfg.attn_head_dim)) != cfg.rope_dims:
        return "the rotated dimensions cannot be written as GPT-NeoX's partial_rotary_factor; use --format hf"
    return None


def gpt_neox(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and tensors of the GPTNeoXForCausalLM that computes a dense-router model."""
    h, hd, d = cfg.n_heads, cfg.attn_head_dim, cfg.d_model
    hidden = cfg.moe.top_k * cfg.moe.expert_hidden
    config = {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": cfg.vocab_size,
        "hidden_size": d, "num_hidden_layers": cfg.n_layers, "num_attention_heads": h,
        "intermediate_size": hidden, "hidden_act": cfg.moe.activation, "layer_norm_eps": cfg.norm_eps,
        "use_parallel_residual": False, "attention_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base,
                            "partial_rotary_factor": cfg.rope_dims / hd},
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
    }
    out = {"gpt_neox.embed_in.weight": tensors["embed.weight"],
           "gpt_neox.final_layer_norm.weight": tensors["norm.weight"],
           "gpt_neox.final_layer_norm.bias": tensors["norm.bias"]}
    if not cfg.tie_embeddings:
        out["embed_out.weight"] = tensors["head.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            out[f"{theirs}{b}.weight"] = tensors[f"{ours}{a}.weight"]
            out[f"{theirs}{b}.bias"] = tensors[f"{ours}{a}.bias"]
        # our qkv rows are (q|k|v, head, dim); GPT-NeoX's are (head, q|k|v, dim)
        qkv = tensors[f"{ours}attn.qkv.weight"].view(3, h, hd, d).transpose(0, 1).reshape(3 * h * hd, d)
        out[f"{theirs}attention.query_key_value.weight"] = qkv
        out[f"{theirs}attention.dense.weight"] = tensors[f"{ours}attn.out.weight"]
        w1, w2 = tensors[f"{ours}ffn.w1.weight"], tensors[f"{ours}ffn.w2.weight"]
        out[f"{theirs}mlp.dense_h_to_4h.weight"], out[f"{theirs}mlp.dense_h_to_4h.bias"] = w1, w1.new_zeros(hidden)
        out[f"{theirs}mlp.dense_4h_to_h.weight"], out[f"{theirs}mlp.dense_4h_to_h.bias"] = w2, w2.new_zeros(d)
    return config, out


def save_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer_model: bytes, out: Path,
            max_positions: int, fmt: str = "hf", step: Optional[int] = None) -> list[Path]:
    """Write a Hugging Face model directory from our model config, parameters (by our names) and
    sentencepiece model. Fails before writing anything if `fmt` cannot express the model."""
    from competesmoe.data.tokenizer import Tokenizer
    from competesmoe.export.hf_tokenizer import write_hf_tokenizer

    if fmt not in FORMATS:
        raise CompeteSMoEError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "hf-native" and (why := native_mismatch(cfg)) is not None:
        raise CompeteSMoEError(f"cannot export as a native transformers model: {why}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if cfg.tie_embeddings:
        tensors.pop("head.weight", None)  # transformers ties it to embed.weight again
    if fmt == "hf":
        config, weights = remote_code_config(cfg), tensors
    else:
        config, weights = gpt_neox(cfg, tensors)
    eos = Tokenizer(tokenizer_model).eos_id
    config.update({"max_position_embeddings": max_positions, "bos_token_id": eos, "eos_token_id": eos,
                   "pad_token_id": 0, "torch_dtype": str(next(iter(weights.values())).dtype).replace("torch.", "")})

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "config.json", out / "generation_config.json", out / "model.safetensors"]
    files[0].write_text(json.dumps(config, indent=1) + "\n")
    files[1].write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": 0,
                                    "do_sample": False}, indent=1) + "\n")
    metadata = {"format": "pt", "competesmoe_step": str(step)}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(files[2]), metadata=metadata)
    if fmt == "hf":
        shutil.copyfile(CODE, out / CODE.name)
        files.append(out / CODE.name)
    return files + write_hf_tokenizer(tokenizer_model, out, max_positions)


def export_checkpoint(reader, out: Path, fmt: str) -> list[Path]:
    """`save_hf` of a committed checkpoint (any layout: experts are read whole by global id)."""
    from competesmoe.config import from_dict

    cfg = from_dict(reader.trainer["config"])
    tensors = {name.split("/", 1)[1]: reader.read(name) for name in reader.tensor_names() if name.startswith("model/")}
    return save_hf(cfg.model, tensors, reader.file("tokenizer.model").read_bytes(), out, cfg.train.seq_len,
                   fmt, reader.trainer["step"])
