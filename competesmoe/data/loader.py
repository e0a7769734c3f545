"""Packed training sequences in a deterministic, resumable order, and ordered validation batches.

The token stream (the shards read back to back) is cut into non-overlapping windows of
seq_len + 1 tokens; a window gives inputs w[:-1] and targets w[1:]. Windows cross document
boundaries (documents are separated by EOS) and shard boundaries; the last partial window is unused.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from competesmoe.errors import ConfigError, DataError

Tokens = Union[np.ndarray, Sequence[np.ndarray]]
Batch = Tuple[torch.Tensor, torch.Tensor]


class TokenStream:
    """Several token arrays (e.g. memory-mapped shards) read as one stream."""

    def __init__(self, tokens: Tokens):
        self.parts: List[np.ndarray] = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, possibly spanning several parts."""
        pieces = []
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[part])
            piece = self.parts[part][offset:offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            part += 1
        return np.concatenate(pieces).astype(np.int64)


def _windows(stream: TokenStream, seq_len: int, indices: Sequence[int]) -> Batch:
    rows = np.stack([stream.read(int(i) * (seq_len + 1), seq_len + 1) for i in indices])
    window = torch.from_numpy(rows)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def _check_layout(seq_len: int, batch: int, dp_rank: int, dp_world: int, batch_name: str) -> None:
    if seq_len < 1 or batch < 1:
        raise ConfigError(f"seq_len and {batch_name} must be >= 1, got {seq_len} and {batch}")
    if dp_world < 1 or not 0 <= dp_rank < dp_world:
        raise ConfigError(f"dp_rank must be in [0, dp_world), got dp_rank={dp_rank}, dp_world={dp_world}")


def _count_windows(stream: TokenStream, seq_len: int, what: str) -> int:
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise DataError(f"the {what} data has {len(stream)} tokens, fewer than one sequence of "
                        f"seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")
    return n


class TrainLoader:
    """Global batches of packed training windows, in a fresh seeded permutation every epoch.

    The only state is `samples_seen`, the number of windows consumed by all data-parallel ranks
    together. Global sample g is window perm(seed, epoch)[g % n_windows] with epoch = g // n_windows.
    A step's global batch is samples samples_seen .. samples_seen + global_batch - 1 (running into
    the next epoch's permutation when needed); rank r of dp_world takes the r-th contiguous chunk of
    global_batch // dp_world samples. Since the state does not depend on the world size, a run
    checkpointed with 4 data-parallel ranks and resumed with 2 (same global_batch) sees exactly the
    samples the 4-rank run would have seen next, only split into 2 chunks instead of 4.
    """

    def __init__(self, tokens: Tokens, seq_len: int, global_batch: int, seed: int,
                 dp_rank: int = 0, dp_world: int = 1):
        _check_layout(seq_len, global_batch, dp_rank, dp_world, "global_batch")
        if global_batch % dp_world:
            raise ConfigError(f"global_batch ({global_batch}) must be divisible by the number of "
                              f"data-parallel ranks ({dp_world})")
        if seed < 0:
            raise ConfigError(f"the data seed must be >= 0, got {seed}")
        self.stream = TokenStream(tokens)
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.n_windows = _count_windows(self.stream, seq_len, "training")
        self.samples_seen = 0
        self._permutations: dict = {}

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp_world

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.n_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # A batch spans at most a few epochs; keep only the ones still needed.
            self._permutations = {e: p for e, p in self._permutations.items() if e >= self.epoch}
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.n_windows)
        return self._permutations[epoch]

    def window_of(self, sample: int) -> int:
        """The window index of global sample number `sample`."""
        epoch, position = divmod(sample, self.n_windows)
        return int(self._permutation(epoch)[position])

    def next_batch(self) -> Batch:
        """This rank's (inputs, targets) of the next global batch, int64 [local_batch, seq_len]."""
        first = self.samples_seen + self.dp_rank * self.local_batch
        windows = [self.window_of(sample) for sample in range(first, first + self.local_batch)]
        self.samples_seen += self.global_batch
        return _windows(self.stream, self.seq_len, windows)

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "seq_len": self.seq_len, "seed": self.seed,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict, same_data: bool = True) -> None:
        """Continue from a saved state; it must come from the same data, seq_len and seed. With
        same_data=False (the run continues on other data) only the sample count carries over:
        the next samples are those of that position in the new data's order."""
        missing = {"samples_seen", "seq_len", "seed", "n_windows"} - set(state)
        if missing:
            raise DataError(f"loader state lacks {', '.join(sorted(missing))}")
        mine = self.state_dict()
        for key in ("seq_len", "seed", "n_windows")[:3 if same_data else 2]:
            if state[key] != mine[key]:
                raise DataError(f"the saved loader state has {key}={state[key]} but this loader has "
                                f"{key}={mine[key]}: resuming would not continue the same sample order "
                                "(different data, seq_len or seed than the checkpointed run)")
        if int(state["samples_seen"]) < 0:
            raise DataError(f"the saved loader state has samples_seen={state['samples_seen']} < 0")
        self.samples_seen = int(state["samples_seen"])


def val_batches(tokens: Tokens, seq_len: int, batch_size: int, max_batches: Optional[int] = None,
                dp_rank: int = 0, dp_world: int = 1) -> Iterator[Batch]:
    """(inputs, targets) over consecutive validation windows, in the same order on every call.

    `batch_size` is per rank. Global batches are batch_size * dp_world consecutive windows, and rank
    r takes the r-th contiguous chunk, as in training; the last global batch is smaller and is split
    evenly, dropping its last (n_windows % dp_world) windows, so every rank gets the same number of
    batches. With max_batches=k the ranks together cover the first k * batch_size * dp_world windows.
    """
    _check_layout(seq_len, batch_size, dp_rank, dp_world, "batch_size")
    stream = TokenStream(tokens)
    n_windows = _count_windows(stream, seq_len, "validation")
    usable = n_windows - n_windows % dp_world
    if usable == 0:
        raise DataError(f"the validation data has {n_windows} sequences of {seq_len + 1} tokens, "
                        f"fewer than the {dp_world} data-parallel ranks")
    step = batch_size * dp_world
    starts = range(0, usable, step)
    if max_batches is not None:
        starts = starts[:max_batches]

    def batches() -> Iterator[Batch]:
        for start in starts:
            per_rank = min(step, usable - start) // dp_world
            first = start + dp_rank * per_rank
            yield _windows(stream, seq_len, range(first, first + per_rank))

    return batches()
