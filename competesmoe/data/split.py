"""Which documents are validation: a rule on each document's text hash, fixed by one pass of counts.

A document is validation when its 64-bit hash falls below val_fraction of the hash range. If no
document does, the ones with the smallest hash are validation instead; if all do, all but the ones
with the largest hash. The rule needs only counts and the extreme hashes, so one streaming pass
(`SplitStats.add`) decides it and every later pass applies it to each document on its own: memory
does not grow with the number of documents.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from competesmoe.errors import DataError

HASH_RANGE = 2**64


def new_document_hash() -> "hashlib._Hash":
    """Feed a document's UTF-8 text in any number of parts; `score(h)` is its split score."""
    return hashlib.blake2b(digest_size=8)


def score(h: "hashlib._Hash") -> int:
    return int.from_bytes(h.digest(), "little")


def document_score(doc: str) -> int:
    """A stable 64-bit hash of a document's text: identical documents always land in the same split."""
    h = new_document_hash()
    h.update(doc.encode("utf-8"))
    return score(h)


@dataclass
class SplitStats:
    """What the split rule needs from all documents: counts and characters, overall, below the
    threshold, and at the smallest and the largest score."""

    threshold: int
    documents: int = 0
    chars: int = 0
    below: int = 0
    below_chars: int = 0
    min_score: int = HASH_RANGE
    min_count: int = 0
    min_chars: int = 0
    max_score: int = -1
    max_count: int = 0
    max_chars: int = 0

    @classmethod
    def for_fraction(cls, val_fraction: float) -> "SplitStats":
        # The float product is an exact integer here; int() is the same cut a uint64 cast makes.
        return cls(threshold=int(val_fraction * HASH_RANGE))

    def add(self, doc_score: int, chars: int) -> None:
        self.documents += 1
        self.chars += chars
        if doc_score < self.threshold:
            self.below += 1
            self.below_chars += chars
        if doc_score < self.min_score:
            self.min_score, self.min_count, self.min_chars = doc_score, 0, 0
        if doc_score == self.min_score:
            self.min_count += 1
            self.min_chars += chars
        if doc_score > self.max_score:
            self.max_score, self.max_count, self.max_chars = doc_score, 0, 0
        if doc_score == self.max_score:
            self.max_count += 1
            self.max_chars += chars


class SplitRule:
    """The validation rule fixed by the statistics of every document."""

    def __init__(self, stats: SplitStats):
        if stats.documents == 0 or stats.min_score == stats.max_score:
            distinct = min(stats.documents, 1)
            raise DataError(f"the sources hold {stats.documents} document(s) with {distinct} distinct "
                            "text(s); a train/validation split needs at least 2 different documents "
                            "(a text file is one document: use a directory of files or a .jsonl file)")
        self.threshold = stats.threshold
        self.min_score, self.max_score = stats.min_score, stats.max_score
        if stats.below == 0:
            self.mode = "smallest"
            self.val_documents, val_chars = stats.min_count, stats.min_chars
        elif stats.below == stats.documents:
            self.mode = "all but largest"
            self.val_documents, val_chars = stats.documents - stats.max_count, stats.chars - stats.max_chars
        else:
            self.mode = "threshold"
            self.val_documents, val_chars = stats.below, stats.below_chars
        self.train_documents = stats.documents - self.val_documents
        self.train_chars = stats.chars - val_chars

    def is_val(self, doc_score: int) -> bool:
        if self.mode == "smallest":
            return doc_score == self.min_score
        if self.mode == "all but largest":
            return doc_score != self.max_score
        return doc_score < self.threshold
