"""Tokenizing labelled document pieces into the train and validation token streams, in parallel.

Pieces (see corpus.Corpus.pieces) are grouped into tasks of about TASK_CHARS characters; each task
becomes two token arrays, one per split, in which every document is followed by EOS. A piece's ids
do not depend on which task it lands in or which process encodes it, and tasks come back in
order, so the streams are the same whatever the number of processes.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from competesmoe.data.tokenizer import Tokenizer
from competesmoe.data.workers import ordered_map

# Characters per task: big enough that handing a task to a worker costs little next to encoding
# it, small enough that 2 tasks per worker in flight hold little memory.
TASK_CHARS = 1 << 20

LabelledPiece = Tuple[str, bool, bool]  # (text, ends its document, the document is validation)


@dataclass
class Task:
    texts: List[str] = field(default_factory=list)
    ends: List[bool] = field(default_factory=list)
    val: List[bool] = field(default_factory=list)
    chars: int = 0


@dataclass
class Encoded:
    train: np.ndarray
    val: np.ndarray
    chars: int


def processes_for(chars: int, workers: int) -> int:
    """How many processes to encode `chars` characters with: no more workers than tasks, and 1
    (this process, nothing to start) when there is only one task."""
    return max(1, min(workers, math.ceil(chars / TASK_CHARS)))


def tasks(pieces: Iterable[LabelledPiece], task_chars: int) -> Iterator[Task]:
    task = Task()
    for text, end, val in pieces:
        task.texts.append(text)
        task.ends.append(end)
        task.val.append(val)
        task.chars += len(text)
        if task.chars >= task_chars:
            yield task
            task = Task()
    if task.texts:
        yield task


class Encoder:
    """Task -> Encoded. by_line: see Tokenizer.encode_texts (exact and faster for BPE)."""

    def __init__(self, model: bytes, by_line: bool, dtype: str):
        self.tokenizer = Tokenizer(model)
        self.by_line = by_line
        self.dtype = np.dtype(dtype)
        self.eos = [self.tokenizer.eos_id]

    def __call__(self, task: Task) -> Encoded:
        ids = self.tokenizer.encode_texts(task.texts, self.by_line)
        streams: Tuple[List[List[int]], List[List[int]]] = ([], [])
        for piece_ids, end, val in zip(ids, task.ends, task.val):
            streams[val].append(piece_ids)
            if end:
                streams[val].append(self.eos)
        train, val = (np.fromiter(itertools.chain.from_iterable(parts), self.dtype, sum(map(len, parts)))
                      for parts in streams)
        return Encoded(train, val, task.chars)


# The encoder of this worker process (set once by _load, so the model is parsed once per process).
_encoder: Optional[Encoder] = None


def _load(model: bytes, by_line: bool, dtype: str) -> None:
    global _encoder
    _encoder = Encoder(model, by_line, dtype)


def _encode(task: Task) -> Encoded:
    return _encoder(task)


@contextlib.contextmanager
def encode_pieces(pieces: Iterable[LabelledPiece], model: bytes, by_line: bool, dtype: np.dtype,
                  processes: int):
    """A context giving the Encoded results in the pieces' order, computed in this process
    (processes <= 1) or by that many worker processes; leaving it stops the workers."""
    if processes <= 1:
        yield map(Encoder(model, by_line, np.dtype(dtype).str), tasks(pieces, TASK_CHARS))
        return
    results = ordered_map(_encode, tasks(pieces, TASK_CHARS), processes,
                          initializer=_load, initargs=(model, by_line, np.dtype(dtype).str))
    with contextlib.closing(results):
        yield results
