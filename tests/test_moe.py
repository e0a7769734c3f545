"""The MoE layer against the plain float64 reference of the method doc's equations."""
import dataclasses

import pytest
import torch

from competesmoe.model.config import CompetitionConfig, MoEConfig
from competesmoe.model.moe.experts import TorchBackend, grouped_matmul
from competesmoe.model.moe.layer import MoELayer

import reference as ref

D, H, B, N = 8, 6, 2, 5
F64 = dict(rtol=1e-9, atol=1e-11)  # float64 against float64: only rounding differs


def make_layer(router="competesmoe", seed=0, dtype=torch.float64, **kw):
    comp_kw = kw.pop("competition", {})
    cfg = MoEConfig(router=router, num_experts=kw.pop("num_experts", 6), top_k=kw.pop("top_k", 2),
                    expert_hidden=H, competition=CompetitionConfig(**comp_kw), **kw)
    cfg.validate("moe")
    torch.manual_seed(seed)
    layer = MoELayer(cfg, D, router_init_std=0.5, n_layers=4).to(dtype)
    with torch.no_grad():  # larger expert weights make responses s well separated (no top-K ties)
        layer.experts.w1.mul_(3.0)
        layer.experts.w2.mul_(3.0)
    return layer.train()


def grads(module, x):
    named = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    named["x"] = x.grad.clone()
    return named


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swiglu"])
@pytest.mark.parametrize("weights", ["renorm", "softmax"])
def test_competition_step_matches_reference(activation, weights):
    comp = dict(weights=weights, alpha=0.2, beta=0.3, gamma=0.4, balance_coef=0.5)
    layer = make_layer(activation=activation, competition=comp)
    torch.manual_seed(1)
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, N, D, dtype=torch.float64)

    y, aux, stats = layer(x, compete=True)
    ((y * g).sum() + aux).backward()
    got = grads(layer, x)

    x_ref = x.detach().clone().requires_grad_()
    w1, w2, wr = (t.detach().clone().requires_grad_() for t in
                  (layer.experts.w1, layer.experts.w2, layer.router.weight))
    r = ref.competition_step(x_ref.view(-1, D), w1, w2, wr, activation, 2, B, 0.2, 0.3, 0.4, 0.5, weights)
    ((r["y"].view(B, N, D) * g).sum() + r["aux"]).backward()

    torch.testing.assert_close(y, r["y"].view(B, N, D), **F64)
    torch.testing.assert_close(aux, r["aux"], **F64)
    torch.testing.assert_close(stats.losses["distill"], r["distill"].detach())
    torch.testing.assert_close(stats.losses["diversity"], r["diversity"].detach())
    torch.testing.assert_close(stats.losses["competition_balance"], r["balance"].detach())
    for name, want in [("experts.w1", w1.grad), ("experts.w2", w2.grad), ("router.weight", wr.grad), ("x", x_ref.grad)]:
        torch.testing.assert_close(got[name], want, **F64, msg=name)


@pytest.mark.parametrize("temperature", [0.05, 3.0])
def test_sharper_distillation_target_matches_reference(temperature):
    """competition.target_temperature=T: the router imitates softmax(s / T); everything else, and
    every gradient, is the paper's step."""
    layer = make_layer(competition=dict(beta=0.3, gamma=0.4, balance_coef=0.5, target_temperature=temperature))
    torch.manual_seed(2)
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, N, D, dtype=torch.float64)
    y, aux, stats = layer(x, compete=True)
    ((y * g).sum() + aux).backward()
    got = grads(layer, x)

    x_ref = x.detach().clone().requires_grad_()
    w1, w2, wr = (t.detach().clone().requires_grad_() for t in
                  (layer.experts.w1, layer.experts.w2, layer.router.weight))
    r = ref.competition_step(x_ref.view(-1, D), w1, w2, wr, "relu", 2, B, 0.2, 0.3, 0.4, 0.5,
                             target_temperature=temperature)
    ((r["y"].view(B, N, D) * g).sum() + r["aux"]).backward()
    paper = ref.competition_step(x.detach().view(-1, D), w1.detach(), w2.detach(), wr.detach(), "relu", 2, B,
                                 0.2, 0.3, 0.4, 0.5)

    torch.testing.assert_close(y, r["y"].view(B, N, D), **F64)
    torch.testing.assert_close(aux, r["aux"], **F64)
    torch.testing.assert_close(stats.losses["distill"], r["distill"].detach(), **F64)
    assert abs(stats.losses["distill"].item() - paper["distill"].item()) > 1e-6  # the switch changes L_D
    p = r["target"]  # the logged entropy is that of the target actually used
    torch.testing.assert_close(stats.s_entropy, -(p * p.log()).sum(-1).mean(), **F64)
    for name, want in [("experts.w1", w1.grad), ("experts.w2", w2.grad), ("router.weight", wr.grad), ("x", x_ref.grad)]:
        torch.testing.assert_close(got[name], want, **F64, msg=name)


def test_competition_gradient_paths():
    """The router learns only from beta * L_D; experts that win nowhere learn only through the
    competition balance term; the winners' weights are not detached."""
    layer = make_layer(num_experts=8, top_k=2, competition=dict(beta=0.3, balance_coef=0.5))
    torch.manual_seed(3)
    x = torch.randn(1, 3, D, dtype=torch.float64, requires_grad=True)
    y, aux, _ = layer(x, compete=True)
    (y.sum() * 2.0 + aux).backward()

    w1, w2, wr = (t.detach().clone().requires_grad_() for t in
                  (layer.experts.w1, layer.experts.w2, layer.router.weight))
    flat = x.detach().view(-1, D)
    r = ref.competition_step(flat, w1, w2, wr, "relu", 2, 1, 0.2, 0.3, 0.005, 0.5)
    (router_grad,) = torch.autograd.grad(0.3 * r["distill"], wr)
    torch.testing.assert_close(layer.router.weight.grad, router_grad, **F64)

    losers = sorted(set(range(8)) - set(r["winners"].flatten().tolist()))
    assert losers, "the setup must leave some experts without a win"
    bal_w1, bal_w2 = torch.autograd.grad(0.5 * r["balance"], (w1, w2))
    for e in losers:
        assert bal_w1[e].abs().sum() > 0  # the balance term reaches every expert
        torch.testing.assert_close(layer.experts.w1.grad[e], bal_w1[e], **F64)
        torch.testing.assert_close(layer.experts.w2.grad[e], bal_w2[e], **F64)

    # Detached weights would leave the winners' w1 gradient equal to that of the outputs alone.
    layer.zero_grad()
    y, _, _ = layer(x, compete=True)
    y.sum().backward()
    w1b = w1.detach().clone().requires_grad_()
    rb = ref.competition_step(flat, w1b, w2.detach(), wr.detach(), "relu", 2, 1, 0.2, 0.3, 0.005, 0.5)
    detached_y = (rb["weights"].detach().unsqueeze(-1) *
                  torch.stack([ref.all_expert_outputs(flat, w1b, w2.detach(), "relu")[rb["winners"][t], t]
                               for t in range(3)])).sum(1)
    (g_detached,) = torch.autograd.grad(detached_y.sum(), w1b)
    assert not torch.allclose(layer.experts.w1.grad, g_detached)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("detach", [False, True])
def test_competition_balance_switches(double_softmax, detach):
    """Each switch, on or off, against the reference, and each shows its effect: the second
    softmax changes the balance loss; detaching it leaves the experts that win nowhere without
    gradient, not detaching gives them one (the balance runs through all experts)."""
    comp = dict(balance_double_softmax=double_softmax, detach_balance=detach, balance_coef=0.5)
    layer = make_layer(num_experts=8, competition=comp)
    torch.manual_seed(4)
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    _, aux, stats = layer(x, compete=True)
    aux.backward()
    w1 = layer.experts.w1.detach().clone().requires_grad_()

    def reference(double):
        return ref.competition_step(x.detach().view(-1, D), w1, layer.experts.w2.detach(), layer.router.weight.detach(),
                                    "relu", 2, B, 0.2, 0.001, 0.005, 0.5, double_softmax=double, detach_balance=detach)

    r = reference(double_softmax)
    torch.testing.assert_close(stats.losses["competition_balance"], r["balance"].detach())
    assert (stats.losses["competition_balance"] - reference(not double_softmax)["balance"]).abs() > 1e-6
    r["aux"].backward()
    torch.testing.assert_close(layer.experts.w1.grad, w1.grad, **F64)
    losers = sorted(set(range(8)) - set(r["winners"].flatten().tolist()))
    assert losers, "the setup must leave an expert without a win"
    for e in losers:
        assert (layer.experts.w1.grad[e].abs().max() == 0) == detach


def reference_routing(router, params, x, top_k):
    """(indices, weights, logits) of a normal step, written from the method doc's section 6."""
    if router == "xmoe":
        emb = params["router.expert_embeddings"]
        emb = emb / emb.norm(dim=-1, keepdim=True).detach() * 1.5
        z = x @ params["router.proj"].t()
        logits = (z / z.norm(dim=-1, keepdim=True)) @ emb.t()
        idx, w = ref.top_k_renorm(ref.softmax(logits / 0.3), top_k)
        return idx, w, logits
    logits = x @ params["router.weight"].t()
    scores = torch.sigmoid(logits) if router in ("sigmoid", "sharede_v3") else ref.softmax(logits)
    idx, w = ref.top_k_renorm(scores, top_k)
    return idx, w, logits


def leaf_copies(module):
    return {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}


@pytest.mark.parametrize("router", ["smoe", "competesmoe", "sigmoid", "xmoe", "sharede_v2", "sharede_v3"])
@pytest.mark.parametrize("balance", ["entropy", "switch"])
def test_normal_step_matches_reference(router, balance):
    layer = make_layer(router=router, balance_loss=balance, balance_coef=0.7, z_loss_coef=0.1)
    torch.manual_seed(2)
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, N, D, dtype=torch.float64)
    y, aux, stats = layer(x, compete=False)
    ((y * g).sum() + aux).backward()

    p = leaf_copies(layer)  # taken after the forward: XMoE renormalises its embeddings in place
    xr = x.detach().clone().requires_grad_()
    flat = xr.view(-1, D)
    idx, w, logits = reference_routing(router, p, flat, layer.top_k)
    want = ref.mix(flat, p["experts.w1"], p["experts.w2"], "relu", idx, w)
    if router.startswith("sharede"):
        want = want + ref.act(flat @ p["shared.w1.weight"].t(), "relu") @ p["shared.w2.weight"].t()
    bal = ref.entropy_balance(logits, B) if balance == "entropy" else ref.switch_balance(logits, idx, 6)
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    want_aux = 0.7 * bal + 0.1 * z
    ((want.view(B, N, D) * g).sum() + want_aux).backward()

    torch.testing.assert_close(y.view(-1, D), want, **F64)
    torch.testing.assert_close(aux, want_aux, **F64)
    assert not stats.competed
    assert stats.load.tolist() == [int((idx == e).sum()) for e in range(6)]
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, p[name].grad, **F64, msg=name)
    torch.testing.assert_close(x.grad, xr.grad, **F64)


def test_router_gets_task_gradient_only_in_normal_steps():
    layer = make_layer(balance_coef=0.0)
    x = torch.randn(B, N, D, dtype=torch.float64)
    y, aux, _ = layer(x, compete=False)
    (y.sum() + aux).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    layer.zero_grad()
    layer.cfg = dataclasses.replace(layer.cfg, competition=CompetitionConfig(beta=0.0))
    y, aux, _ = layer(x, compete=True)
    (y.sum() + aux).backward()
    assert layer.router.weight.grad is None or layer.router.weight.grad.abs().sum() == 0


def test_eval_mode_never_competes():
    layer = make_layer().eval()
    x = torch.randn(B, N, D, dtype=torch.float64)
    y_eval, _, stats = layer(x, compete=True)
    y_router, _, _ = layer(x, compete=False)
    assert not stats.competed
    torch.testing.assert_close(y_eval, y_router)


def test_competition_on_other_router_is_an_error():
    with pytest.raises(ValueError, match="no competition"):
        make_layer(router="smoe")(torch.randn(1, 2, D, dtype=torch.float64), compete=True)


def test_dropless_when_every_token_picks_the_same_experts():
    layer = make_layer(router="smoe", num_experts=6, top_k=2)
    row = torch.randn(D, dtype=torch.float64)
    x = row.expand(B, N, D).contiguous()
    y, _, stats = layer(x)
    idx, w, _ = reference_routing("smoe", leaf_copies(layer), x.view(-1, D), 2)
    want = ref.mix(x.view(-1, D), layer.experts.w1.detach(), layer.experts.w2.detach(), "relu", idx, w)
    torch.testing.assert_close(y.view(-1, D), want, **F64)
    assert sorted(stats.load.tolist()) == [0, 0, 0, 0, B * N, B * N]


def test_competition_statistics():
    layer = make_layer(num_experts=6, top_k=2)
    x = torch.randn(B, N, D, dtype=torch.float64)
    _, _, stats = layer(x, compete=True)
    flat = x.view(-1, D)
    s = ref.responses(flat, layer.experts.w1.detach(), layer.experts.w2.detach(), "relu")
    winners = torch.topk(s, 2).indices
    router_top = torch.topk(flat @ layer.router.weight.detach().t(), 2).indices
    agreement = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(router_top, winners)) / (B * N * 2)
    p = ref.softmax(s)
    assert stats.competed
    assert stats.load.sum() == B * N * 2
    torch.testing.assert_close(stats.s_mean, s.mean())
    torch.testing.assert_close(stats.s_std, s.std())
    torch.testing.assert_close(stats.s_entropy, -(p * p.log()).sum(-1).mean())
    assert stats.agreement.item() == pytest.approx(agreement)
    # all 6 experts forward (2*D*H + 2*H*D each), backward twice that
    assert stats.competition_flops == 3 * B * N * 6 * 4 * D * H


def test_aux_losses_correct_under_gradient_accumulation():
    """Two half batches with loss / 2 each accumulate the gradients of the full batch."""
    for compete in (False, True):
        layer = make_layer(router="competesmoe", competition=dict(beta=0.5, gamma=0.3, balance_coef=0.4))
        torch.manual_seed(5)
        x = torch.randn(4, N, D, dtype=torch.float64)
        y, aux, _ = layer(x, compete=compete)
        (y.pow(2).mean() + aux).backward()
        full = {n: p.grad.clone() for n, p in layer.named_parameters()}
        layer.zero_grad()
        for half in x.chunk(2):
            y, aux, _ = layer(half, compete=compete)
            ((y.pow(2).mean() + aux) / 2).backward()
        for n, p in layer.named_parameters():
            torch.testing.assert_close(p.grad, full[n], **F64, msg=n)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_matches_loop(activation, dtype):
    torch.manual_seed(0)
    E, d, h = 5, 16, 8
    counts = [3, 0, 7, 1, 0]
    cols = 2 * h if activation == "swiglu" else h
    x = torch.randn(sum(counts), d, dtype=dtype, requires_grad=True)
    w1 = torch.randn(E, d, cols, dtype=dtype, requires_grad=True)
    w2 = torch.randn(E, h, d, dtype=dtype, requires_grad=True)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    g = torch.randn(sum(counts), d, dtype=dtype)
    y = TorchBackend().mlp(x, offsets, w1, w2, activation)
    (y * g).sum().backward()
    x64, w164, w264 = (t.detach().double().requires_grad_() for t in (x, w1, w2))
    want = ref.grouped_loop(x64, counts, w164, w264, activation)
    (want * g.double()).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else F64
    torch.testing.assert_close(y.double(), want, **tol)
    for got, ref_t in ((x, x64), (w1, w164), (w2, w264)):
        torch.testing.assert_close(got.grad.double(), ref_t.grad, **tol)


def test_grouped_matmul_both_paths_agree():
    torch.manual_seed(0)
    x = torch.randn(11, 8)
    w = torch.randn(3, 8, 4)
    offsets = torch.tensor([4, 4, 11], dtype=torch.int32)
    want = torch.cat([x[:4] @ w[0], x[4:11] @ w[2]])
    torch.testing.assert_close(grouped_matmul(x, w, offsets), want)  # grouped_mm
    torch.testing.assert_close(grouped_matmul(x.double(), w.double(), offsets), want.double(), rtol=1e-5, atol=1e-5)


def test_torch_scores_match_reference_with_small_chunks():
    torch.manual_seed(0)
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(5, D, H, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, H, D, dtype=torch.float64, requires_grad=True)
    backend = TorchBackend(score_chunk_bytes=1)  # one expert per checkpointed chunk
    s = backend.scores(x, w1, w2, "gelu")
    g = torch.randn_like(s)
    (s * g).sum().backward()
    xr, w1r, w2r = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
    want = ref.responses(xr, w1r, w2r, "gelu")
    (want * g).sum().backward()
    torch.testing.assert_close(s, want)
    for got, r in ((x, xr), (w1, w1r), (w2, w2r)):
        torch.testing.assert_close(got.grad, r.grad)
