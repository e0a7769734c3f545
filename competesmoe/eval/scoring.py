"""Batched log-likelihood scoring of token sequences with a trained model.

Everything the evaluation reports (perplexities, zero-shot accuracies, the lm-eval adapter) is a
sum of log p(token | previous tokens) over some tokens of some sequence. A request is a token
sequence `ids` and the position `first` of its first scored token; the scorer cuts it into windows
the model can take, runs the windows of all requests in padded batches, and sums per request.

Conventions (shared with EleutherAI's lm-eval harness, except where noted):
- Every sequence starts with EOS. Training documents are packed with an EOS before each, so EOS is
  what a document start looks like to the model (lm-eval adds its prefix token only to an empty
  context; we add it always, since our model never saw a document start without it).
- A (context, continuation) pair is encoded as one text, and the continuation's tokens are read off
  the tail (`split_pair`), as lm-eval does: the tokenizer has no dummy prefix, so " word" and "word"
  differ and the tokens must come from the text as the model would see it.
- A sequence longer than seq_len is scored in windows of at most seq_len inputs: each scored token
  is predicted once, the earliest context is dropped first, and a long sequence is chunked from its
  start with the last chunk given full context (lm-eval's rolling windows).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from competesmoe.eval.distributed import LOCAL, Group, merge, shard
from competesmoe.progress import Progress


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p over the scored tokens
    greedy: bool  # every scored token is the model's argmax
    tokens: int  # how many tokens were scored


@dataclass(frozen=True)
class Window:
    request: int  # index of the request it belongs to
    inputs: tuple[int, ...]  # what the model reads, at most seq_len tokens
    targets: tuple[int, ...]  # the tokens predicted by the last len(targets) positions


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of the text context + continuation.

    Trailing whitespace of the context moves to the continuation (a space starts the next word's
    token). The whole text is encoded once; its tokens that equal the context's own encoding are the
    context, the rest the continuation. When a token spans the boundary (the tokenizer merges the
    end of the context with the start of the continuation), that token goes to the continuation, so
    the scored tokens always cover the whole continuation; lm-eval instead cuts at the length of the
    context's encoding, which misplaces the boundary in that case.
    """
    stripped = context.rstrip()
    if len(stripped) < len(context):
        context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = common_prefix(tokenizer.encode(context), whole) if context else 0
    return whole[:n_context], whole[n_context:]


def windows_of(ids: Sequence[int], first: int, seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that predict ids[first:] once each, from at most seq_len inputs.

    Targets are cut into chunks of seq_len from `first` on; a chunk's inputs are the seq_len tokens
    before its last target (fewer at the start), so the first chunk and any chunk after the first
    have as much context as fits.
    """
    if not 1 <= first <= len(ids):
        raise ValueError(f"first scored position {first} is outside 1..{len(ids)}")
    for start in range(first, len(ids), seq_len):
        stop = min(start + seq_len, len(ids))
        lo = max(0, stop - 1 - seq_len)
        yield list(ids[lo:stop - 1]), list(ids[start:stop])


class Scorer:
    """Scores requests with a model in eval mode, split over the ranks of `group`."""

    def __init__(self, model: nn.Module, tokenizer, seq_len: int, batch_size: int = 32,
                 group: Group = LOCAL, autocast_dtype: Optional[torch.dtype] = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.seq_len, self.batch_size, self.group = seq_len, batch_size, group
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype

    # -- text-level requests -------------------------------------------------------------------
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], what: str = "scoring") -> list[Score]:
        """log p(continuation | context) for each (context, continuation)."""
        requests = []
        for context, continuation in pairs:
            ctx, cont = split_pair(self.tokenizer, context, continuation)
            if not cont:
                raise ValueError(f"empty continuation after context {context[-40:]!r}")
            requests.append(([self.tokenizer.eos_id] + ctx + cont, 1 + len(ctx)))
        return self.score(requests, what)

    def rolling(self, texts: Sequence[str], what: str = "scoring") -> list[Score]:
        """log p(text) of each whole text, every token scored once (perplexity)."""
        requests = [([self.tokenizer.eos_id] + self.tokenizer.encode(t), 1) for t in texts]
        return self.score(requests, what)

    # -- token-level requests -------------------------------------------------------------------
    def score(self, requests: Sequence[tuple[Sequence[int], int]], what: str = "scoring") -> list[Score]:
        """Sum of log p(ids[t] | ids[:t]) for t >= first, for each (ids, first)."""
        windows = [Window(i, tuple(inp), tuple(tgt))
                   for i, (ids, first) in enumerate(requests)
                   for inp, tgt in windows_of(ids, first, self.seq_len)]
        # Longest first: batches hold windows of similar length (little padding), and a batch
        # that does not fit in memory fails at once rather than at the end.
        order = sorted(range(len(windows)), key=lambda w: -len(windows[w].inputs))
        mine = [order[j] for j in shard(len(order), self.group.rank, self.group.world)]
        local = self.score_windows([windows[w] for w in mine], what)
        parts = self.group.all_gather(list(zip(mine, local)))
        per_window = merge(parts, len(windows))
        logprob = [0.0] * len(requests)
        greedy = [True] * len(requests)
        tokens = [0] * len(requests)
        for window, (lp, g) in zip(windows, per_window):
            logprob[window.request] += lp
            greedy[window.request] &= g
            tokens[window.request] += len(window.targets)
        return [Score(lp, g, n) for lp, g, n in zip(logprob, greedy, tokens)]

    @torch.no_grad()
    def score_windows(self, windows: Sequence[Window], what: str = "scoring") -> list[tuple[float, bool]]:
        """(sum of target log-probs, all targets greedy) of each window, in batches."""
        was_training = self.model.training
        self.model.eval()
        progress = Progress(len(windows), f"eval: {what}", unit="window", enabled=self.group.is_main,
                            log=lambda line: print(line, flush=True), min_interval_s=30)
        out: list[tuple[float, bool]] = []
        try:
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start:start + self.batch_size]
                out.extend(self._score_batch(batch))
                progress.update(len(batch))
        finally:
            progress.close()
            self.model.train(was_training)
        return out

    def _score_batch(self, batch: Sequence[Window]) -> list[tuple[float, bool]]:
        width = max(len(w.inputs) for w in batch)
        # Right padding: causal attention keeps it from reaching the real tokens, and MoE routing
        # is dropless (no capacity a padding token could take from a real one).
        x = torch.zeros(len(batch), width, dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for b, w in enumerate(batch):
            n, k = len(w.inputs), len(w.targets)
            x[b, :n] = torch.tensor(w.inputs)
            rows += [b] * k
            cols += range(n - k, n)
            targets += w.targets
            owner += [b] * k
        x = x.to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            logits = self.model(x).logits
        # Only the scored positions are normalised: [scored tokens, vocab] rather than the batch's.
        picked = logits[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)].float()
        targets_t = torch.tensor(targets, device=self.device)
        token_lp = picked.log_softmax(-1).gather(1, targets_t[:, None]).squeeze(1).double()
        hit = (picked.argmax(-1) == targets_t).long()
        owner_t = torch.tensor(owner, device=self.device)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=self.device).index_add_(0, owner_t, token_lp)
        misses = torch.zeros(len(batch), dtype=torch.long, device=self.device).index_add_(0, owner_t, 1 - hit)
        return [(float(s), int(m) == 0) for s, m in zip(sums.tolist(), misses.tolist())]

