"""Export a checkpoint as a Hugging Face model directory.

Two formats (`competesmoe-ckpt export RUN OUT --format hf|hf-native`):

hf          Every configuration. config.json + model.safetensors + our modeling code
            (modeling_competesmoe.py, torch and transformers only; `auto_map` registers it), so
            `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it. The
            parameter names are ours.
hf-native   Configurations that a transformers architecture computes exactly, loaded without
            remote code (`native_architecture` says which, or why none):
              Mixtral   model.norm=rmsnorm, router smoe or competesmoe (which routes with its
                        softmax router at inference), swiglu experts, moe_every=1, rope_fraction=1
              Llama     model.norm=rmsnorm, router dense, swiglu, rope_fraction=1
              GPT-NeoX  model.norm=layernorm (the default), router dense, relu/gelu/silu,
                        head_dim = d_model / n_heads (sequential residuals, zero MLP biases)
            The default MoE configs (LayerNorm with a bias) have none: every MoE architecture in
            transformers normalises with RMSNorm (Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek, GLM-4-MoE,
            ...), and those with LayerNorm route differently (PhiMoE's sparsemixer) or have no norm
            bias (DBRX). sigmoid/sharede_v3 routing exists there only with other attention (MLA,
            q/k norms), xmoe nowhere; partial RoPE rules out Mixtral and Llama.

Both write the tokenizer as tokenizer.json (competesmoe.export.hf_tokenizer: the same ids as our
sentencepiece model), generation_config.json (EOS, greedy) and set max_position_embeddings to the
trained sequence length, which lm-eval uses as its window.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
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
        "rope_theta": cfg.rope_base, "norm": cfg.norm, "layer_norm_eps": cfg.norm_eps, "moe_every": cfg.moe_every,
        "router": moe.router, "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "expert_hidden": moe.expert_hidden, "activation": moe.activation,
        "num_shared_experts": moe.num_shared_experts if moe.router.startswith("sharede") else 0,
        "xmoe_dim": moe.routing_dim, "xmoe_temperature": moe.xmoe_temperature,
        "xmoe_embedding_norm": moe.xmoe_embedding_norm, "tie_word_embeddings": cfg.tie_embeddings,
    }


def native_architecture(cfg: ModelConfig) -> str:
    """The transformers architecture that computes `cfg` exactly: gpt_neox, llama or mixtral.
    Raises CompeteSMoEError saying why none does."""
    def refuse(why: str):
        raise CompeteSMoEError(f"cannot export as a native transformers model: {why}; use --format hf")

    moe, full_rope = cfg.moe, cfg.rope_dims == cfg.attn_head_dim
    if moe.router == "dense" and cfg.norm == "layernorm":
        if moe.activation not in NATIVE_ACTIVATIONS:
            refuse(f"GPT-NeoX (LayerNorm, dense) has no gated MLP for activation '{moe.activation}'")
        if cfg.attn_head_dim * cfg.n_heads != cfg.d_model:
            refuse("GPT-NeoX needs head_dim * n_heads == d_model")
        if int(cfg.attn_head_dim * (cfg.rope_dims / cfg.attn_head_dim)) != cfg.rope_dims:
            refuse("the rotated dimensions cannot be written as GPT-NeoX's partial_rotary_factor")
        return "gpt_neox"
    if cfg.norm == "layernorm":
        refuse(f"router '{moe.router}' has MoE layers, and every MoE architecture in transformers normalises "
               "with RMSNorm where this model has LayerNorm with a bias (train with model.norm=rmsnorm)")
    if moe.activation != "swiglu":
        refuse(f"Llama and Mixtral have gated (swiglu) MLPs, this model '{moe.activation}'")
    if not full_rope:
        refuse(f"Llama and Mixtral rotate every head dimension, this model {cfg.rope_dims} of "
               f"{cfg.attn_head_dim} (set model.rope_fraction=1)")
    if moe.router == "dense":
        return "llama"
    if moe.router not in ("smoe", "competesmoe"):
        refuse(f"router '{moe.router}' routes unlike Mixtral (softmax top-K, renormalised); no transformers "
               "architecture with standard attention routes this way")
    if cfg.moe_every != 1:
        refuse("Mixtral has a MoE layer in every layer (model.moe_every=1)")
    return "mixtral"


def _layer_tensor(tensors: dict[str, torch.Tensor], layer: int, name: str) -> torch.Tensor:
    """Our tensor `name` of block `layer`."""
    return tensors[f"blocks.{layer}.{name}"]


def _split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q, k, v = qkv.view(3, cfg.n_heads * cfg.attn_head_dim, cfg.d_model)
    return {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v}


def native(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and tensors of the native transformers model that computes `cfg`."""
    arch = native_architecture(cfg)
    h, hd, d = cfg.n_heads, cfg.attn_head_dim, cfg.d_model
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    common = {"vocab_size": cfg.vocab_size, "hidden_size": d, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": h, "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0}
    if arch == "gpt_neox":
        hidden = cfg.moe.top_k * cfg.moe.expert_hidden
        config = {**common, "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
                  "intermediate_size": hidden, "hidden_act": cfg.moe.activation, "layer_norm_eps": cfg.norm_eps,
                  "use_parallel_residual": False, "attention_bias": False, "hidden_dropout": 0.0,
                  "rope_parameters": {**rope, "partial_rotary_factor": cfg.rope_dims / hd}}
        names = {"embed.weight": "gpt_neox.embed_in.weight", "norm.weight": "gpt_neox.final_layer_norm.weight",
                 "norm.bias": "gpt_neox.final_layer_norm.bias", "head.weight": "embed_out.weight"}
    else:
        config = {**common, "num_key_value_heads": h, "head_dim": hd, "rms_norm_eps": cfg.norm_eps,
                  "hidden_act": "silu", "rope_parameters": rope}
        names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "head.weight": "lm_head.weight"}
        if arch == "llama":
            config.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
                          mlp_bias=False, intermediate_size=cfg.moe.top_k * cfg.moe.expert_hidden)
        else:
            config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", sliding_window=None,
                          intermediate_size=cfg.moe.expert_hidden, num_local_experts=cfg.moe.num_experts,
                          num_experts_per_tok=cfg.moe.top_k, router_jitter_noise=0.0, output_router_logits=False)
    out = {theirs: tensors[ours] for ours, theirs in names.items() if ours in tensors}  # no head when tied
    for i in range(cfg.n_layers):
        ours = partial(_layer_tensor, tensors, i)
        if arch == "gpt_neox":
            layer = f"gpt_neox.layers.{i}."
            for a, b in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
                out[f"{layer}{b}.weight"], out[f"{layer}{b}.bias"] = ours(f"{a}.weight"), ours(f"{a}.bias")
            # our qkv rows are (q|k|v, head, dim); GPT-NeoX's are (head, q|k|v, dim)
            out[f"{layer}attention.query_key_value.weight"] = (
                ours("attn.qkv.weight").view(3, h, hd, d).transpose(0, 1).reshape(3 * h * hd, d))
            out[f"{layer}attention.dense.weight"] = ours("attn.out.weight")
            w1, w2 = ours("ffn.w1.weight"), ours("ffn.w2.weight")
            out[f"{layer}mlp.dense_h_to_4h.weight"] = w1
            out[f"{layer}mlp.dense_h_to_4h.bias"] = w1.new_zeros(w1.shape[0])
            out[f"{layer}mlp.dense_4h_to_h.weight"], out[f"{layer}mlp.dense_4h_to_h.bias"] = w2, w2.new_zeros(d)
            continue
        layer = f"model.layers.{i}."
        out[f"{layer}input_layernorm.weight"] = ours("attn_norm.weight")
        out[f"{layer}post_attention_layernorm.weight"] = ours("ffn_norm.weight")
        out.update({f"{layer}self_attn.{k}": v for k, v in _split_qkv(ours("attn.qkv.weight"), cfg).items()})
        out[f"{layer}self_attn.o_proj.weight"] = ours("attn.out.weight")
        if arch == "llama":
            gate, up = ours("ffn.w1.weight").chunk(2, dim=0)  # our W1 columns: gate then up
            out[f"{layer}mlp.gate_proj.weight"], out[f"{layer}mlp.up_proj.weight"] = gate, up
            out[f"{layer}mlp.down_proj.weight"] = ours("ffn.w2.weight")
        else:  # Mixtral's experts are ours transposed: gate_up_proj [E, 2h, d], down_proj [E, d, h]
            out[f"{layer}mlp.gate.weight"] = ours("ffn.router.weight")
            out[f"{layer}mlp.experts.gate_up_proj"] = ours("ffn.experts.w1").transpose(1, 2)
            out[f"{layer}mlp.experts.down_proj"] = ours("ffn.experts.w2").transpose(1, 2)
    return config, out


def save_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer_model: bytes, out: Path,
            max_positions: int, fmt: str = "hf", step: Optional[int] = None) -> list[Path]:
    """Write a Hugging Face model directory from our model config, parameters (by our names) and
    sentencepiece model. Fails before writing anything if `fmt` cannot express the model."""
    from competesmoe.data.tokenizer import Tokenizer
    from competesmoe.export.hf_tokenizer import write_hf_tokenizer

    if fmt not in FORMATS:
        raise CompeteSMoEError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "hf-native":
        native_architecture(cfg)  # refuses before anything is written
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if cfg.tie_embeddings:
        tensors.pop("head.weight", None)  # transformers ties it to embed.weight again
    if fmt == "hf":
        config, weights = remote_code_config(cfg), tensors
    else:
        config, weights = native(cfg, tensors)
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
