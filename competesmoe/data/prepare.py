"""prepare_data: documents -> train/val split -> tokenizer -> token shards, cached by input hash.

The output directory is `<cache_dir>/<key>`, where the key hashes the content of the sources, the
tokenizer settings, val_fraction and the shard format version: the same inputs reuse the directory,
any change builds a new one. A directory is built under a temporary name and renamed into place
once meta.json is written, so an interrupted run never leaves a directory that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np

from competesmoe.data.config import DataConfig
from competesmoe.data.corpus import Corpus
from competesmoe.data.shards import (FORMAT_VERSION, SPLITS, TOKENIZER_FILE, PreparedData, ShardWriter,
                                     load_prepared, read_meta, token_dtype, write_meta)
from competesmoe.data.tokenizer import Tokenizer, sample_training_lines, tokenizer_settings, train_tokenizer
from competesmoe.errors import DataError

__all__ = ["PreparedData", "prepare_data", "load_prepared", "assign_splits", "document_score", "cache_key"]

Log = Callable[[str], None]

# Documents are tokenized in batches of about this many characters, on all cores.
_ENCODE_BATCH_CHARS = 4_000_000


def document_score(doc: str) -> int:
    """A stable 64-bit hash of a document's text: identical documents always land in the same split."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


def assign_splits(scores: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which documents (by score) are validation: those scoring below val_fraction of the hash range,
    adjusted so that each split gets at least one document."""
    if len(np.unique(scores)) < 2:
        raise DataError(f"the sources hold {len(scores)} document(s) with {len(np.unique(scores))} distinct "
                        "text(s); a train/validation split needs at least 2 different documents "
                        "(a text file is one document: use a directory of files or a .jsonl file)")
    is_val = scores < np.uint64(val_fraction * 2**64)
    if not is_val.any():
        is_val = scores == scores.min()
    if is_val.all():
        is_val = scores != scores.max()
    return is_val


def cache_key(fingerprint: str, cfg: DataConfig) -> str:
    settings = {"format_version": FORMAT_VERSION, "input": fingerprint, "val_fraction": cfg.val_fraction,
                "tokenizer": tokenizer_settings(cfg.tokenizer, cfg.vocab_size, cfg.tokenizer_train_chars)}
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()


class _Progress:
    """A tqdm bar when stderr is a terminal, otherwise a log line at every 10%."""

    def __init__(self, total: int, what: str, log: Log):
        self.total, self.what, self.log = max(total, 1), what, log
        self.done, self.next_percent = 0, 10
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=what, unit="char", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif 100 * self.done // self.total >= self.next_percent:
            percent = 100 * self.done // self.total
            self.log(f"data: {self.what} {percent}%")
            self.next_percent = percent // 10 * 10 + 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tokenize(corpus: Corpus, is_val: np.ndarray, tokenizer: Tokenizer, writers: dict, log: Log,
              total_chars: int) -> None:
    """Encode every document and append it, followed by EOS, to its split's shards."""
    progress = _Progress(total_chars, "tokenizing", log)
    batch: List[str] = []
    flags: List[bool] = []

    def flush() -> None:
        ids = tokenizer.encode_batch(batch)
        for split, want_val in (("train", False), ("val", True)):
            stream: List[int] = []
            for doc_ids, flag in zip(ids, flags):
                if flag == want_val:
                    stream.extend(doc_ids)
                    stream.append(tokenizer.eos_id)
            writers[split].write(np.array(stream, dtype=np.int64))
        progress.update(sum(map(len, batch)))
        batch.clear()
        flags.clear()

    changed = DataError("the sources changed while being prepared (a different number of documents "
                        "on the second reading); run again once they are stable")
    n_docs, batch_chars = 0, 0
    for doc in corpus:
        if n_docs == len(is_val):
            raise changed
        batch.append(doc)
        flags.append(bool(is_val[n_docs]))
        n_docs += 1
        batch_chars += len(doc)
        if batch_chars >= _ENCODE_BATCH_CHARS:
            flush()
            batch_chars = 0
    if n_docs != len(is_val):
        raise changed
    flush()
    progress.close()


def _score_documents(corpus: Corpus) -> Tuple[np.ndarray, np.ndarray]:
    """Each document's split score and its length in characters."""
    scores, lengths = [], []
    for doc in corpus:
        scores.append(document_score(doc))
        lengths.append(len(doc))
    return np.array(scores, dtype=np.uint64), np.array(lengths, dtype=np.int64)


def _build(corpus: Corpus, cfg: DataConfig, fingerprint: str, out: Path, log: Log) -> None:
    log(f"data: reading {'; '.join(corpus.describe())}")
    scores, lengths = _score_documents(corpus)
    is_val = assign_splits(scores, cfg.val_fraction)
    log(f"data: {len(scores)} documents, {int(lengths.sum()):,} characters; "
        f"{int((~is_val).sum())} train / {int(is_val.sum())} validation documents")

    train_docs = (doc for doc, val in zip(corpus, is_val) if not val)
    lines = sample_training_lines(train_docs, int(lengths[~is_val].sum()), cfg.tokenizer_train_chars)
    sample_chars = sum(map(len, lines))
    log(f"data: training a {cfg.tokenizer} tokenizer, vocab {cfg.vocab_size}, on {sample_chars:,} characters")
    tokenizer = Tokenizer(train_tokenizer(lines, cfg.tokenizer, cfg.vocab_size))
    del lines
    tokenizer.save(out / TOKENIZER_FILE)

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out, split, dtype) for split in SPLITS}
    _tokenize(corpus, is_val, tokenizer, writers, log, int(lengths.sum()))
    splits = {}
    for split, flag in (("train", False), ("val", True)):
        shards = writers[split].close()
        splits[split] = {"documents": int((is_val == flag).sum()), "tokens": writers[split].tokens,
                         "shards": shards}
    write_meta(out, {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tokenizer.sha256, "trained_on_chars": sample_chars,
                      "settings": tokenizer_settings(cfg.tokenizer, cfg.vocab_size, cfg.tokenizer_train_chars)},
        "sources": corpus.describe(),
        "input_fingerprint": fingerprint,
        "val_fraction": cfg.val_fraction,
        "splits": splits,
    })


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError as err:
        if read_meta(final) is None:
            raise DataError(f"cannot move the prepared data from {tmp} to {final}: {err}") from None
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_data(cfg: DataConfig, log: Log = print) -> PreparedData:
    """Tokenize the configured sources into verified shards, or reuse them if already prepared."""
    start = time.monotonic()
    corpus = Corpus(cfg.sources, cfg.text_field)
    fingerprint = corpus.fingerprint()
    cache_dir = Path(cfg.cache_dir)
    final = cache_dir / cache_key(fingerprint, cfg)
    if read_meta(final) is not None:
        log(f"data: reusing prepared data in {final} (inputs unchanged)")
        return load_prepared(final)
    if final.exists():
        log(f"data: {final} is incomplete; rebuilding it")
        shutil.rmtree(final)

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the published directory of a shared cache.
    tmp = cache_dir / f".partial-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _build(corpus, cfg, fingerprint, tmp, log)
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    data = load_prepared(final)
    log(f"data: prepared {final} in {time.monotonic() - start:.1f}s: "
        + ", ".join(f"{split} {data.meta['splits'][split]['tokens']:,} tokens" for split in SPLITS))
    return data
