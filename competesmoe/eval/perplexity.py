"""Perplexity on the run's validation data and on text files.

Validation: the run's prepared validation stream (from its config's data section, rebuilt from the
sources if the cache is gone) cut into the windows of seq_len + 1 tokens the trainer validates on,
each scored on its own; so `loss` is the trainer's `val_loss` taken over all windows (or the first
`limit`) rather than the first train.eval_batches batches.

A text file is one document: EOS, then its tokens, every token scored once with up to seq_len
tokens of context (rolling windows). Bits per byte are reported too: unlike perplexity they do
not depend on the tokenizer, so runs with different vocabularies compare.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from competesmoe.config import Config
from competesmoe.data.loader import TokenStream
from competesmoe.data.prepare import prepare_data
from competesmoe.errors import DataError
from competesmoe.eval.scoring import Score, Scorer


def _summary(scores: Sequence[Score]) -> dict:
    tokens = sum(s.tokens for s in scores)
    loss = -sum(s.logprob for s in scores) / max(tokens, 1)
    return {"tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 700))}


def validation_requests(cfg: Config, tokenizer_sha256: str, limit: Optional[int],
                        log: Callable[[str], None]) -> list[tuple[list[int], int]]:
    """(window tokens, 1) for each validation window of seq_len + 1 tokens."""
    data = prepare_data(cfg.data, log=log)
    if data.tokenizer.sha256 != tokenizer_sha256:
        raise DataError(f"the prepared data in {data.directory} was tokenized with another tokenizer "
                        "than the checkpoint's")
    stream = TokenStream(data.val_tokens())
    width = cfg.train.seq_len + 1
    n = len(stream) // width
    if n == 0:
        raise DataError(f"the validation data has {len(stream)} tokens, fewer than one window of {width}")
    if limit is not None:
        n = min(n, limit)
    return [(stream.read(i * width, width).tolist(), 1) for i in range(n)]


def validation_perplexity(scorer: Scorer, requests: Sequence[tuple[list[int], int]]) -> dict:
    return {"n": len(requests), **_summary(scorer.score(requests, "val"))}


def read_text_file(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text: {err}") from None


def text_perplexity(scorer: Scorer, text: str, name: str = "text") -> dict:
    summary = _summary(scorer.rolling([text], name))
    n_bytes = len(text.encode("utf-8"))
    summary["bytes"] = n_bytes
    summary["bits_per_byte"] = summary["loss"] * summary["tokens"] / math.log(2) / max(n_bytes, 1)
    return summary
