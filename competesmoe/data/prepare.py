"""prepare_data: documents -> train/val split -> tokenizer -> token shards, cached by input hash.

The output directory is `<cache_dir>/<key>`, where the key hashes the content of the sources, the
tokenizer settings, val_fraction and the shard format version: the same inputs reuse the directory,
any change builds a new one. A directory is built under a temporary name and renamed into place
once meta.json is written, so an interrupted run never leaves a directory that looks complete.

The build streams the corpus three times, a piece at a time (corpus.Corpus.pieces):
  1. scan      hash every document; keep only the counts that fix the split rule (split.py), and
               the hash of each document longer than one piece (8 bytes per million characters
               or more), so that later passes know its split at its first piece;
  2. sample    draw the tokenizer's training lines from the train documents, then train it;
  3. tokenize  in `data.workers` processes, tasks in order (encode.py); write the shards.
Peak memory is therefore bounded by the piece and task sizes, the number of workers and the
tokenizer sample (data.tokenizer_train_chars), not by the size of the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

from competesmoe.data.config import DataConfig
from competesmoe.data.corpus import Corpus
from competesmoe.data.encode import LabelledPiece, encode_pieces, processes_for
from competesmoe.data.shards import (
    FORMAT_VERSION,
    SPLITS,
    TOKENIZER_FILE,
    PreparedData,
    ShardWriter,
    load_prepared,
    read_meta,
    token_dtype,
    write_meta,
)
from competesmoe.data.split import SplitRule, SplitStats, new_document_hash, score
from competesmoe.data.tokenizer import Tokenizer, sample_training_lines, tokenizer_settings, train_tokenizer
from competesmoe.data.workers import resolve_workers
from competesmoe.errors import DataError
from competesmoe.progress import Progress

__all__ = ["PreparedData", "prepare_data", "load_prepared", "cache_key"]

Log = Callable[[str], None]


def cache_key(fingerprint: str, cfg: DataConfig) -> str:
    # data.workers is left out on purpose: the output does not depend on it.
    settings = {"format_version": FORMAT_VERSION, "input": fingerprint, "val_fraction": cfg.val_fraction,
                "tokenizer": tokenizer_settings(cfg.tokenizer, cfg.vocab_size, cfg.tokenizer_train_chars)}
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclass
class _Scan:
    """What the first pass keeps: the split statistics, the scores of the documents of more than
    one piece (in order) and a digest of every document's score, to check that later passes read
    the same documents."""

    stats: SplitStats
    long_scores: array = field(default_factory=lambda: array("Q"))
    digest: str = ""


def _documents(corpus: Corpus) -> Iterator[Tuple[str, bool, int, "hashlib._Hash"]]:
    """Every piece with: whether it ends its document, its index within the document, and the
    running hash of the document up to and including it."""
    h, index = new_document_hash(), 0
    for piece, last in corpus.pieces():
        h.update(piece.encode("utf-8"))
        yield piece, last, index, h
        h, index = (new_document_hash(), 0) if last else (h, index + 1)


def _scan(corpus: Corpus, val_fraction: float) -> _Scan:
    scan = _Scan(SplitStats.for_fraction(val_fraction))
    digest = hashlib.blake2b(digest_size=16)
    chars = 0
    for piece, last, index, h in _documents(corpus):
        chars += len(piece)
        if last:
            doc_score = score(h)
            scan.stats.add(doc_score, chars)
            digest.update(doc_score.to_bytes(8, "little"))
            if index > 0:
                scan.long_scores.append(doc_score)
            chars = 0
    scan.digest = digest.hexdigest()
    return scan


def _labelled(corpus: Corpus, rule: SplitRule, scan: _Scan) -> Iterator[LabelledPiece]:
    """Every piece with whether it ends its document and whether that document is validation.
    Read to the end, it checks that the documents are the ones the scan saw."""
    changed = DataError("the sources changed while being prepared (different documents than on the "
                        "first reading); run again once they are stable")
    long_scores = iter(scan.long_scores)
    digest = hashlib.blake2b(digest_size=16)
    is_val, expected = False, None
    for piece, last, index, h in _documents(corpus):
        if index == 0 and not last:  # the first piece of a long document: the scan knows its score
            expected = next(long_scores, None)
            if expected is None:
                raise changed
            is_val = rule.is_val(expected)
        if last:
            doc_score = score(h)
            if index == 0:
                is_val = rule.is_val(doc_score)
            elif doc_score != expected:
                raise changed
            digest.update(doc_score.to_bytes(8, "little"))
        yield piece, last, is_val
    if digest.hexdigest() != scan.digest or next(long_scores, None) is not None:
        raise changed


def _sample(corpus: Corpus, rule: SplitRule, scan: _Scan, max_chars: int) -> List[str]:
    """The tokenizer's training lines, drawn from the train documents."""
    train_pieces = (piece for piece, _, is_val in _labelled(corpus, rule, scan) if not is_val)
    return sample_training_lines(train_pieces, rule.train_chars, max_chars)


def _tokenize(corpus: Corpus, rule: SplitRule, scan: _Scan, tokenizer: Tokenizer, kind: str, writers: dict,
              workers: int, log: Log) -> None:
    """Encode every document and append it, followed by EOS, to its split's shards."""
    total = scan.stats.chars
    processes = processes_for(total, workers)
    where = f"{processes} worker processes" if processes > 1 else "this process"
    log(f"data: tokenizing {total:,} characters in {where}")
    start = time.monotonic()
    pieces = _labelled(corpus, rule, scan)
    with Progress(total, "data: tokenizing", unit="char", log=log) as progress, \
            encode_pieces(pieces, tokenizer.model, kind == "bpe", writers["train"].dtype, processes) as results:
        for encoded in results:
            writers["train"].write(encoded.train)
            writers["val"].write(encoded.val)
            progress.update(encoded.chars)
    seconds = time.monotonic() - start
    log(f"data: tokenized {total:,} characters in {seconds:.1f}s ({total / max(seconds, 1e-9) / 1e6:.2f}M/s)")


def _build(corpus: Corpus, cfg: DataConfig, fingerprint: str, out: Path, log: Log) -> None:
    log(f"data: reading {'; '.join(corpus.describe())}")
    scan = _scan(corpus, cfg.val_fraction)
    rule = SplitRule(scan.stats)
    log(f"data: {scan.stats.documents} documents, {scan.stats.chars:,} characters; "
        f"{rule.train_documents} train / {rule.val_documents} validation documents")

    lines = _sample(corpus, rule, scan, cfg.tokenizer_train_chars)
    sample_chars = sum(map(len, lines))
    log(f"data: training a {cfg.tokenizer} tokenizer, vocab {cfg.vocab_size}, on {sample_chars:,} characters")
    tokenizer = Tokenizer(train_tokenizer(lines, cfg.tokenizer, cfg.vocab_size))
    del lines
    tokenizer.save(out / TOKENIZER_FILE)

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out, split, dtype) for split in SPLITS}
    _tokenize(corpus, rule, scan, tokenizer, cfg.tokenizer, writers, resolve_workers(cfg.workers), log)
    splits = {}
    for split, documents in (("train", rule.train_documents), ("val", rule.val_documents)):
        shards = writers[split].close()
        splits[split] = {"documents": documents, "tokens": writers[split].tokens, "shards": shards}
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


def _partial_prefix(final: Path) -> str:
    return f".partial-{final.name}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_dead_builds(final: Path, log: Log) -> None:
    """Remove what builds of `final` on this host left when they were killed outright (SIGKILL,
    out of memory, a lost node): a build that ends in any other way removes its own. A build on
    another host of a shared cache, or one whose process still runs, is left alone."""
    host = socket.gethostname()
    for path in final.parent.glob(_partial_prefix(final) + "*"):
        owner = path.name[len(_partial_prefix(final)):].rsplit("-", 2)  # host, pid, random
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1])):
            log(f"data: removing {path}, left by a build that was killed (pid {owner[1]})")
            shutil.rmtree(path, ignore_errors=True)


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
    _remove_dead_builds(final, log)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the published directory of a shared cache.
    tmp = cache_dir / f"{_partial_prefix(final)}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
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
