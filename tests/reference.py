"""Plain, independent re-implementations of the method doc's equations, for tests only.

Written for clarity over speed: loops over experts and tokens, dense over all experts, float64.
Nothing here imports the package's MoE code.
"""
from __future__ import annotations

import math

import torch


def act(h, name):
    if name == "relu":
        return torch.clamp(h, min=0)
    if name == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if name == "silu":
        return h / (1 + torch.exp(-h))
    if name == "swiglu":
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
        return gate / (1 + torch.exp(-gate)) * up
    raise ValueError(name)


def expert(x, w1, w2, e, activation):
    """E_e(x) = act(x W1_e) W2_e."""
    return act(x @ w1[e], activation) @ w2[e]


def all_expert_outputs(x, w1, w2, activation):
    """[E, T, d]: every expert on every token."""
    return torch.stack([expert(x, w1, w2, e, activation) for e in range(w1.shape[0])])


def responses(x, w1, w2, activation):
    """s[t, e] = mean_c log(1 + exp(E_e(x_t)_c))."""
    outs = all_expert_outputs(x, w1, w2, activation)
    return torch.log1p(torch.exp(outs)).mean(-1).t()


def grouped_loop(x_sorted, counts, w1, w2, activation):
    """The per-expert loop over tokens grouped by expert."""
    out, start = [], 0
    for e, c in enumerate(counts):
        out.append(expert(x_sorted[start:start + c], w1, w2, e, activation))
        start += c
    return torch.cat(out)


def softmax(z):
    z = z - z.max(-1, keepdim=True).values
    return torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)


def entropy_balance(logits, num_seqs):
    """-mean_b H(mean_n softmax(logits_{b,n}))."""
    p = softmax(logits).view(num_seqs, -1, logits.shape[-1])
    total = 0.0
    for b in range(num_seqs):
        marginal = p[b].mean(0)
        total = total + (-(marginal * torch.log(marginal)).sum())
    return -total / num_seqs


def switch_balance(logits, indices, num_experts):
    p = softmax(logits)
    f = torch.stack([(indices == e).sum() for e in range(num_experts)]).to(p.dtype) / indices.numel()
    return num_experts * (f * p.mean(0)).sum()


def mix(x, w1, w2, activation, indices, weights):
    """y_t = sum_k w_{t,k} E_{i_{t,k}}(x_t), token by token."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for k in range(indices.shape[1]):
            y = y + weights[t, k] * expert(x[t:t + 1], w1, w2, int(indices[t, k]), activation)[0]
        rows.append(y)
    return torch.stack(rows)


def top_k_renorm(scores, k):
    top, idx = torch.topk(scores, k, dim=-1)
    return idx, top / top.sum(-1, keepdim=True)


def competition_step(x, w1, w2, router_w, activation, k, num_seqs, alpha, beta, gamma, balance_coef,
                     weights_mode="renorm", double_softmax=False, detach_balance=False, target_temperature=1.0):
    """Method doc section 2, dense over all experts. Returns the output and each loss. The
    distillation target is softmax(s / target_temperature) (1 = the paper's softmax(s))."""
    outs = all_expert_outputs(x, w1, w2, activation)  # [E, T, d]
    s = torch.log1p(torch.exp(outs)).mean(-1).t()  # [T, E]
    top, winners = torch.topk(s, k, dim=-1)
    w = top / top.sum(-1, keepdim=True) if weights_mode == "renorm" else softmax(top)
    T = x.shape[0]
    winner_out = torch.stack([torch.stack([outs[winners[t, j], t] for j in range(k)]) for t in range(T)])  # [T, K, d]
    y = (w.unsqueeze(-1) * winner_out).sum(1)
    p_c = softmax(s / target_temperature).detach()
    p_r = softmax(x @ router_w.t())
    l_d = ((p_r - p_c) ** 2).mean() + alpha * ((p_r.gather(1, winners) - p_c.gather(1, winners)) ** 2).mean()
    u = winner_out / winner_out.norm(dim=-1, keepdim=True)
    sim = u @ u.transpose(1, 2)
    sim = sim * (1 - torch.eye(k, dtype=sim.dtype))
    l_div = sim.sum() / (T * k * k)
    bal_in = softmax(s) if double_softmax else s
    l_bal = entropy_balance(bal_in.detach() if detach_balance else bal_in, num_seqs)
    aux = beta * l_d + gamma * l_div + balance_coef * l_bal
    return dict(y=y, s=s, winners=winners, weights=w, distill=l_d, diversity=l_div, balance=l_bal, aux=aux,
                target=p_c)
