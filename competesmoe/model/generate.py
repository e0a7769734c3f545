"""Text generation with a Transformer: greedy, temperature and top-p sampling, batched, KV cache.

    new = generate(model, [[eos] + tokenizer.encode(prompt)], max_new_tokens=50,
                   sampling=Sampling(temperature=0.8, top_p=0.95, seed=0))

Prompts of different lengths are left-padded; the padding is masked (KVCache.pad), and RoPE only
sees relative positions, so each prompt continues exactly as it would alone (greedy: the same
tokens; sampling draws from one seeded generator for the whole batch, so a row's samples depend
on the batch it is in). With the cache each step runs the model on one new token per prompt;
`use_cache=False` runs it on the whole sequence every step (the reference, and the benchmark's
baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from competesmoe.model.kv_cache import KVCache
from competesmoe.model.transformer import Transformer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens holding top_p of the mass
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (the most
    likely token always stays); rows are not renormalised (multinomial does not need it)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def next_tokens(logits: Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> Tensor:
    """[B] tokens from the last position's logits [B, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = top_p_filter((logits.float() / sampling.temperature).softmax(-1), sampling.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_id: Optional[int] = None, sampling: Sampling = Sampling(),
             use_cache: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (token ids), up to max_new_tokens, stopping a prompt at
    eos_id (not included). The model is put in eval mode: MoE layers route with their router."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    pad = torch.ones(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
        pad[row, longest - len(prompt):] = False
    pad = pad if bool(pad.any()) else None
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)

    n_layers, capacity = len(model.blocks), longest + max_new_tokens
    cache = KVCache(n_layers, capacity, pad) if use_cache else None
    new = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    step_input = tokens
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(step_input, cache=cache).logits[:, -1]
        else:  # the whole sequence again, through a fresh cache only for its padding mask
            everything = torch.cat([tokens, new], dim=1)
            logits = model(everything, cache=KVCache(n_layers, everything.shape[1], pad)).logits[:, -1]
        token = next_tokens(logits, sampling, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        new = torch.cat([new, token[:, None]], dim=1)
        step_input = token[:, None]
        if bool(done.all()):
            break
    out = []
    for row in new.tolist():
        out.append(row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return out
