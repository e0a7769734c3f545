"""Initial weights (competesmoe/model/init.py, model/build.py): the same whatever the expert-parallel
layout, drawn from the intended distributions, and built in a rank's own share of memory."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from competesmoe.model.build import build_shard
from competesmoe.model.config import ModelConfig, MoEConfig


def config(router="competesmoe", **model):
    moe = MoEConfig(router=router, num_experts=8, top_k=2, expert_hidden=12, activation="swiglu")
    return ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, moe=moe, **model)


def is_expert(name: str) -> bool:
    return ".experts.w" in name


@pytest.mark.parametrize("router,extra", [("competesmoe", {}), ("xmoe", {"norm": "rmsnorm"}),
                                          ("sharede_v2", {"tie_embeddings": True, "moe_every": 2})])
def test_expert_i_and_dense_weights_are_the_same_under_every_ep_size(router, extra):
    cfg = config(router, **extra)
    whole = build_shard(cfg, seed=3).state_dict()
    for ep in (2, 4):
        for rank in range(ep):
            shard = build_shard(cfg, seed=3, ep=ep, ep_rank=rank).state_dict()
            assert shard.keys() == whole.keys()
            for name, t in shard.items():
                if is_expert(name):
                    per = 8 // ep
                    assert t.shape[0] == per
                    assert torch.equal(t, whole[name][rank * per:(rank + 1) * per]), (ep, rank, name)
                else:
                    assert torch.equal(t, whole[name]), (ep, rank, name)
    other_seed = build_shard(cfg, seed=4).state_dict()
    drawn = [n for n, t in whole.items() if t.std() > 0]  # norms are constant
    assert all(not torch.equal(whole[n], other_seed[n]) for n in drawn)
    w1 = whole["blocks.1.ffn.experts.w1"]
    assert not torch.equal(w1[0], w1[1])  # every expert its own stream


def test_tied_embeddings_stay_tied_after_the_meta_build():
    model = build_shard(config(tie_embeddings=True), seed=0, ep=2, ep_rank=1)
    assert model.head.weight is model.embed.weight


def test_initial_weights_follow_the_intended_distributions():
    # Big enough tensors for the sample std to be within ~2% of the intended one.
    L, d, E, h, V, K = 4, 128, 8, 256, 4096, 2
    cfg = ModelConfig(vocab_size=V, d_model=d, n_layers=L, n_heads=4, moe_every=2,
                      moe=MoEConfig(router="smoe", num_experts=E, top_k=K, expert_hidden=h, activation="gelu"))
    model = build_shard(cfg, seed=0, ep=2, ep_rank=1)
    inner = cfg.n_heads * cfg.attn_head_dim
    out_scale = math.sqrt(2.0 / L)  # residual output projections shrink with depth (GPT-2 style)
    want = {  # written from the init's description: fan-in^-1/2, outputs scaled down, embed 0.02
        "embed.weight": 0.02, "head.weight": d ** -0.5,
        "attn.qkv.weight": d ** -0.5, "attn.out.weight": inner ** -0.5 * out_scale,
        "ffn.router.weight": d ** -0.5 * out_scale,
        "ffn.experts.w1": d ** -0.5, "ffn.experts.w2": (K * h) ** -0.5 * out_scale,
        "ffn.w1.weight": d ** -0.5, "ffn.w2.weight": (K * h) ** -0.5 * out_scale,  # the dense layers
    }
    seen = set()
    for name, t in model.named_parameters():
        if "norm" in name:
            assert torch.all(t == (1.0 if name.endswith("weight") else 0.0)), name
            continue
        kind = next(k for k in want if name.endswith(k))
        seen.add(kind)
        assert abs(t.mean().item()) < 0.05 * want[kind], name
        assert t.std().item() == pytest.approx(want[kind], rel=0.03), name
    assert seen == set(want)
    inv_freq = model.blocks[0].attn.rope.inv_freq
    dims = cfg.rope_dims
    assert torch.allclose(inv_freq, cfg.rope_base ** (-torch.arange(0, dims, 2).float() / dims))


def test_xmoe_expert_embeddings_start_orthogonal():
    cfg = config("xmoe")
    emb = build_shard(cfg, seed=1).blocks[0].ffn.router.expert_embeddings.detach().double()
    assert emb.shape == (8, 4)  # routing_dim = E / 2: the columns are orthogonal, of norm 0.32
    assert torch.allclose(emb.t() @ emb, 0.32 ** 2 * torch.eye(4, dtype=torch.float64), atol=1e-6)


BUILD_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from competesmoe.model.build import build_shard
    from competesmoe.model.config import ModelConfig, MoEConfig
    torch.set_num_threads(1)
    ep, rank = int(sys.argv[1]), int(sys.argv[2])
    moe = MoEConfig(num_experts=64, top_k=2, expert_hidden=512, activation="gelu")
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, moe=moe)
    small = ModelConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2,
                        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=4))
    build_shard(small, 0, 2, 1)  # load every code path first: what is measured is the build
    def status(key):  # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's peak
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from the current RSS
    before = status("VmRSS")
    model = build_shard(cfg, 0, ep, rank)
    peak = status("VmHWM")
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() * 4 for p in model.parameters())
    print(json.dumps({"growth": peak - before, "experts": experts, "total": total}))
""")


def test_a_rank_builds_in_its_own_share_of_memory():
    """Peak RSS growth of the build, in a fresh process per layout: the rank's own parameter bytes
    plus a small constant (one tensor drawn at a time), so the experts' part falls as 1/EP."""
    measured = {}
    for ep in (1, 2, 4):
        out = subprocess.run([sys.executable, "-c", BUILD_PROBE, str(ep), str(ep - 1)], capture_output=True,
                             text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True)
        measured[ep] = json.loads(out.stdout.strip().splitlines()[-1])
    full_experts = measured[1]["experts"]
    assert full_experts > 250e6  # the model is big enough for the constant not to matter
    for ep, m in measured.items():
        assert m["experts"] == full_experts // ep
        assert 0.8 * m["total"] <= m["growth"] <= 1.2 * m["total"] + 50e6, (ep, m)
    # the build of the whole model on every rank (what it was) would not pass at ep=4
    assert measured[4]["growth"] < 0.4 * measured[1]["total"]
