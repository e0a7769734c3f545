"""The on-disk layout of prepared data: token shards, meta.json, and reading them back verified.

A prepared directory holds
  tokenizer.model       the sentencepiece model
  train_00000.bin ...   raw little-endian token ids (uint16, or uint32 for vocabularies > 65535)
  val_00000.bin
  meta.json             written last: format version, dtype, vocabulary, tokenizer sha256, and per
                        split the document and token counts and each shard's token count and blake2b
Documents are concatenated in each split's stream, each followed by the EOS id.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

from competesmoe.data.tokenizer import Tokenizer
from competesmoe.errors import DataError

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
# Shards are capped so that no single file gets unwieldy to copy or checksum.
SHARD_TOKENS = 64 * 2**20

_READ_CHUNK = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 - 1 else np.dtype("<u4")


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends one split's tokens to `<split>_00000.bin`, `<split>_00001.bin`, ... of at most
    `max_tokens` tokens each, recording each shard's token count and checksum."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, max_tokens: int = SHARD_TOKENS):
        self.directory = directory
        self.split = split
        self.dtype = np.dtype(dtype)
        self.max_tokens = max_tokens
        self.shards: List[dict] = []
        self.tokens = 0
        self._file = None
        self._hash = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(tokens.max())} does not fit in {self.dtype.name}")
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                self._open_shard()
            room = self.max_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["tokens"] += part.size
            self.tokens += part.size
            if self.shards[-1]["tokens"] == self.max_tokens:
                self._close_shard()

    def close(self) -> List[dict]:
        """Finish the last shard; returns [{"file", "tokens", "blake2b"}, ...]."""
        if self._file is not None:
            self._close_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = (self.directory / name).open("wb")
        self._hash = hashlib.blake2b(digest_size=16)
        self.shards.append({"file": name, "tokens": 0, "blake2b": ""})

    def _close_shard(self) -> None:
        self._file.close()
        self.shards[-1]["blake2b"] = self._hash.hexdigest()
        self._file = self._hash = None


def write_meta(directory: Path, meta: dict) -> None:
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(directory: Path) -> dict | None:
    """The directory's meta.json if it is complete and of this format version, else None."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta


@dataclass
class PreparedData:
    """A prepared data directory: its meta.json, tokenizer, and memory-mapped token shards."""

    directory: Path
    meta: dict
    tokenizer: Tokenizer

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def train_tokens(self) -> List[np.memmap]:
        """The train shards in order; read together they are one stream (see loader.TrainLoader)."""
        return self._tokens("train")

    def val_tokens(self) -> List[np.memmap]:
        return self._tokens("val")

    def _tokens(self, split: str) -> List[np.memmap]:
        return [np.memmap(self.directory / shard["file"], dtype=self.dtype, mode="r", shape=(shard["tokens"],))
                for shard in self.meta["splits"][split]["shards"]]

    def verify(self) -> None:
        """Check the tokenizer and every shard against meta.json: sizes, then checksums."""
        fix = f"the prepared data is damaged: delete {self.directory} and prepare it again to rebuild"
        if self.tokenizer.sha256 != self.meta["tokenizer"]["sha256"]:
            raise DataError(f"{self.directory / TOKENIZER_FILE}: sha256 {self.tokenizer.sha256} does "
                            f"not match meta.json ({self.meta['tokenizer']['sha256']}); {fix}")
        for split in SPLITS:
            for shard in self.meta["splits"][split]["shards"]:
                path = self.directory / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                actual = path.stat().st_size if path.is_file() else None
                if actual is None:
                    raise DataError(f"{path}: shard is missing; {fix}")
                if actual != expected:
                    raise DataError(f"{path}: expected {expected} bytes ({shard['tokens']} tokens of "
                                    f"{self.dtype.name}), found {actual} bytes; {fix}")
                checksum = _checksum(path)
                if checksum != shard["blake2b"]:
                    raise DataError(f"{path}: checksum mismatch (blake2b expected {shard['blake2b']}, "
                                    f"got {checksum}); {fix}")


def load_prepared(directory: str | Path) -> PreparedData:
    """Open a prepared data directory and verify it."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta is None:
        raise DataError(f"{directory} is not a complete prepared data directory of format version "
                        f"{FORMAT_VERSION} (no readable {META_FILE}); prepare the data again")
    data = PreparedData(directory, meta, Tokenizer.load(directory / TOKENIZER_FILE))
    data.verify()
    return data
