"""The transformer LM: reference size, configuration errors, forward behaviour."""
import math

import pytest
import torch

from competesmoe.config import load_config, to_dict
from competesmoe.errors import ConfigError
from competesmoe.model.config import ModelConfig, MoEConfig
from competesmoe.model.moe.layer import FeedForward, MoELayer
from competesmoe.model.transformer import RotaryEmbedding, Transformer, lm_loss

CONFIGS = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs"


def tiny(**moe):
    return ModelConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, **moe))


def test_reference_config_has_the_papers_size():
    cfg = load_config(CONFIGS / "reference_lm.yaml")
    m = cfg.model
    V, d, L, E, K, h = m.vocab_size, m.d_model, m.n_layers, m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden
    inner = m.n_heads * m.head_dim
    # Written from the architecture: untied embedding and head, per layer qkv + out projections,
    # two LayerNorms (weight + bias), a router, E experts of 2*d*h; a final LayerNorm.
    per_layer_shared = 3 * d * inner + inner * d + 2 * 2 * d + E * d
    total = 2 * V * d + L * (per_layer_shared + E * 2 * d * h) + 2 * d
    active = 2 * V * d + L * (per_layer_shared + K * 2 * d * h) + 2 * d
    counts = Transformer(m).param_counts()
    assert counts == {"total": total, "active": active}
    assert 150e6 < total < 158e6 and 34e6 < active < 38e6  # "about 154M total, about 36M active"


@pytest.mark.parametrize("override,key", [
    ("model.moe.top_k=99", "model.moe.top_k"),
    ("model.moe.router=nope", "model.moe.router"),
    ("model.moe.competition.omega=1.5", "model.moe.competition.omega"),
    ("model.moe.competition.omega=-0.1", "model.moe.competition.omega"),
    ("model.d_model=30", "model.d_model"),
    ("model.moe.activation=tanh", "model.moe.activation"),
    ("model.norm=batchnorm", "model.norm"),
    ("model.moe.no_such_key=1", "model.moe.no_such_key"),
    ("train.steps=many", "train.steps"),
    ("parallel.zero_stage=3", "parallel.zero_stage"),
])
def test_bad_config_names_the_key(override, key):
    base = ["model.d_model=32", "model.n_heads=4", "model.head_dim=null"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "reference_lm.yaml", base + [override])


def test_build_time_validation_without_yaml():
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k"):
        Transformer(ModelConfig(vocab_size=100, moe=MoEConfig(num_experts=4, top_k=5)))


def test_forward_shapes_and_aux_loss():
    torch.manual_seed(0)
    model = Transformer(tiny(router="competesmoe"))
    tokens = torch.randint(0, 50, (2, 7))
    out = model(tokens, compete=[True, False, True])
    assert out.logits.shape == (2, 7, 50)
    assert [s.competed for s in out.moe_stats] == [True, False, True]
    assert out.aux_loss.requires_grad and out.aux_loss.ndim == 0
    with pytest.raises(ValueError, match="3 MoE layers"):
        model(tokens, compete=[True])
    model.eval()
    assert not any(s.competed for s in model(tokens, compete=[True] * 3).moe_stats)


def test_causal():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    tokens = torch.randint(0, 50, (1, 9))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 50
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_moe_every_and_dense_router_and_tied_embeddings():
    cfg = tiny()
    cfg.moe_every = 2
    model = Transformer(cfg)
    assert [type(b.ffn) for b in model.blocks] == [FeedForward, MoELayer, FeedForward]
    assert model.blocks[0].ffn.w1.weight.shape == (16, 16)  # dense FFN: top_k * expert_hidden = 16
    dense = Transformer(tiny(router="dense"))
    assert all(isinstance(b.ffn, FeedForward) for b in dense.blocks) and not dense.moe_layers
    assert dense.param_counts()["total"] == dense.param_counts()["active"]
    cfg = tiny()
    cfg.tie_embeddings = True
    tied = Transformer(cfg)
    assert tied.head.weight is tied.embed.weight


def test_rope_rotates_only_the_configured_fraction():
    rope = RotaryEmbedding(dims=4, base=10000.0)
    x = torch.randn(1, 1, 5, 10)
    y = rope(x)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    # position 3, first frequency (1.0): the pair (x0, x2) rotates by 3 radians
    c, s = math.cos(3.0), math.sin(3.0)
    torch.testing.assert_close(y[0, 0, 3, 0], x[0, 0, 3, 0] * c - x[0, 0, 3, 2] * s)
    torch.testing.assert_close(y[0, 0, 3, 2], x[0, 0, 3, 0] * s + x[0, 0, 3, 2] * c)
    assert ModelConfig(d_model=512, n_heads=4, head_dim=82, rope_fraction=0.5).rope_dims == 40


def test_rmsnorm_option():
    """model.norm=rmsnorm: weight-only RMS normalisation x / sqrt(mean(x^2) + eps) * w everywhere
    (checked by hand here; tests/test_export.py checks it against transformers' Mixtral and Llama)."""
    cfg = tiny()
    cfg.norm = "rmsnorm"
    model = Transformer(cfg)
    layer_norm = Transformer(tiny())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * 3 + 1 and not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    # no norm biases: 7 norms x d_model fewer parameters than the LayerNorm model
    assert layer_norm.param_counts()["total"] - model.param_counts()["total"] == 7 * 16
    x = torch.randn(3, 16, dtype=torch.float64)
    norm = model.norm.double()
    torch.nn.init.normal_(norm.weight)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_loss_decreases_when_fitting_a_batch(norm):
    torch.manual_seed(0)
    cfg = tiny(router="competesmoe")
    cfg.norm = norm
    model = Transformer(cfg)
    tokens = torch.randint(0, 50, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        out = model(tokens[:, :-1], compete=[step % 3 == 0] * 3)
        loss = lm_loss(out.logits, tokens[:, 1:])
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert lm_loss(torch.zeros(1, 1, 50), torch.tensor([[3]])).item() == pytest.approx(math.log(50))


def expected_params(m: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters written from the method doc (sections 1, 5, 6) for any router:
    untied embedding and head, per layer qkv and output projections, two LayerNorms (weight and
    bias) and an FFN; a final LayerNorm. The MoE FFN holds E bias-free 2-layer experts (swiglu's
    first layer holds gate and up), a router (W_g: E x d; XMoE: a projection to its routing dim
    and E expert embeddings of that dim) and, for SharedE, an always-on shared MLP; `dense` is a
    plain FFN of top_k * expert_hidden. Active counts top_k experts instead of E."""
    moe = m.moe
    d, inner = m.d_model, m.n_heads * (m.head_dim or m.d_model // m.n_heads)

    def mlp(hidden):
        return d * hidden * (2 if moe.activation == "swiglu" else 1) + hidden * d

    total = active = m.vocab_size * d * (1 if m.tie_embeddings else 2) + 2 * d
    for layer in range(m.n_layers):
        common = 3 * d * inner + inner * d + 2 * 2 * d
        if moe.router == "dense" or (layer + 1) % m.moe_every:  # MoE in every moe_every-th layer
            total += common + mlp(moe.top_k * moe.expert_hidden)
            active += common + mlp(moe.top_k * moe.expert_hidden)
            continue
        if moe.router == "xmoe":
            dim = moe.xmoe_dim or moe.num_experts // 2
            common += dim * d + moe.num_experts * dim
        else:
            common += moe.num_experts * d
        if moe.router.startswith("sharede"):
            common += mlp(moe.num_shared_experts * moe.expert_hidden)
        total += common + moe.num_experts * mlp(moe.expert_hidden)
        active += common + moe.top_k * mlp(moe.expert_hidden)
    return total, active


SHIPPED = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml"))


def test_every_config_is_checked_below():
    routers = ("competesmoe", "dense", "sharede_v2", "sharede_v3", "sigmoid", "smoe", "xmoe")
    assert {str(p) for p in SHIPPED} == {"reference_lm.yaml", "smoke.yaml",
                                         "quality/study_cpu.yaml"} | {f"routers/{r}.yaml" for r in routers}


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_loads_and_builds(path):
    """Each config says what its header and the README promise, and the model it builds has the
    parameter counts of the architecture (on the meta device for the 154M-parameter ones)."""
    cfg = load_config(CONFIGS / path)
    reference = to_dict(load_config(CONFIGS / "reference_lm.yaml"))
    smoke = to_dict(load_config(CONFIGS / "smoke.yaml"))
    mine = to_dict(cfg)
    if path.parts[0] == "routers":  # the reference LM with another router, and its own run.dir
        assert cfg.model.moe.router == path.stem and cfg.run.dir == f"runs/reference_lm_{path.stem}"
        mine["model"]["moe"]["router"], mine["run"]["dir"] = "competesmoe", "runs/reference_lm"
        assert mine == reference
    elif path.name == "study_cpu.yaml":  # smoke's model and data, 1500 steps of 16 x 128 tokens, router per run
        assert mine["model"] == dict(smoke["model"], moe=dict(smoke["model"]["moe"], router="smoe"))
        assert mine["data"] == smoke["data"]
        assert (cfg.train.steps, cfg.train.global_batch, cfg.train.seq_len) == (1500, 16, 128)
    elif path.name == "reference_lm.yaml":  # method doc, section 5
        m, t = cfg.model, cfg.train
        assert (m.n_layers, m.d_model, m.n_heads, m.attn_head_dim, m.rope_dims, m.moe.num_experts, m.moe.top_k,
                m.moe.expert_hidden, m.moe.activation, m.vocab_size) == (16, 512, 4, 82, 40, 64, 8, 128, "relu", 8000)
        assert (t.seq_len, t.global_batch, t.steps, t.lr, t.min_lr_ratio, t.weight_decay, t.grad_clip) == (
            1024, 64, 100_000, 2.5e-4, 0.1, 0.01, 0.1)
    else:  # README: "a 2.4M-parameter (1.5M active) CompeteSMoE LM with 16 experts per layer"
        assert cfg.model.moe.router == "competesmoe" and cfg.model.moe.num_experts == 16
        assert [round(n / 1e6, 1) for n in expected_params(cfg.model)] == [2.4, 1.5]
    total, active = expected_params(cfg.model)
    with torch.device("meta" if cfg.model.d_model >= 512 else "cpu"):
        model = Transformer(cfg.model)
    assert model.param_counts() == {"total": total, "active": active}
    assert sum(p.numel() for p in model.parameters()) == total


def test_base_config_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  d_model: 64\n  n_heads: 2\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nmodel:\n  n_heads: 4\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.model.d_model, cfg.model.n_heads) == (64, 4)
    router = load_config(CONFIGS / "routers" / "xmoe.yaml")
    reference = load_config(CONFIGS / "reference_lm.yaml")
    assert router.model.moe.router == "xmoe" and router.model.n_layers == reference.model.n_layers
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("model:\n  widht: 3\n")
    (tmp_path / "d.yaml").write_text("_base_: c.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: bad config key 'model\.widht'"):
        load_config(tmp_path / "d.yaml")
