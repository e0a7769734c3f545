"""Training a sentencepiece tokenizer on a sample of the corpus, and the small wrapper the rest uses.

The tokenizer is lossless: no normalisation, no whitespace folding, no dummy prefix, and byte
fallback for characters outside the vocabulary, so `decode(encode(text)) == text` for any string.
Id 0 is <unk> (unused with byte fallback) and id 1 is EOS, which separates documents in the shards.
"""
from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

import numpy as np
import sentencepiece as spm

from competesmoe.errors import DataError

EOS_ID = 1
# sentencepiece drops sentences longer than max_sentence_length bytes; longer lines are cut into
# chunks of this many characters (at most 4 UTF-8 bytes each) so that none is dropped.
MAX_LINE_CHARS = 4096
# The thread count is recorded in the model file and changes its bytes, so it is fixed rather than
# taken from the machine: the same inputs then give the same model (and sha256) everywhere.
_TRAIN_THREADS = 4
_TRAIN_SEED = 0
_SAMPLE_SEED = 0

TRAINER_OPTIONS = dict(
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    unk_id=0,
    eos_id=EOS_ID,
    bos_id=-1,
    pad_id=-1,
    max_sentence_length=4 * MAX_LINE_CHARS,
    num_threads=_TRAIN_THREADS,
)


def tokenizer_settings(kind: str, vocab_size: int, train_chars: int) -> dict:
    """Everything that determines the trained model given the documents (part of the cache key)."""
    return {"kind": kind, "vocab_size": vocab_size, "train_chars": train_chars,
            "options": TRAINER_OPTIONS, "seeds": [_TRAIN_SEED, _SAMPLE_SEED],
            "sentencepiece": spm.__version__}


def _lines(doc: str) -> Iterator[str]:
    for line in doc.split("\n"):
        for start in range(0, len(line), MAX_LINE_CHARS):
            yield line[start:start + MAX_LINE_CHARS]


def sample_training_lines(texts: Iterable[str], total_chars: int, max_chars: int) -> List[str]:
    """About `max_chars` characters of lines drawn uniformly from texts holding `total_chars`.

    Each line is kept with probability max_chars / total_chars from a fixed-seed generator, so the
    sample is spread over the whole corpus and is the same for the same texts. The texts are whole
    documents or consecutive pieces of them cut after a newline or, inside a line, a multiple of
    MAX_LINE_CHARS characters from its start: either gives the same sample.
    """
    keep = max_chars / max(total_chars, 1)
    rng = random.Random(_SAMPLE_SEED)
    sample, chars = [], 0
    for text in texts:
        for line in _lines(text):
            if line.strip() and (keep >= 1 or rng.random() < keep):
                sample.append(line)
                chars += len(line)
                if chars >= max_chars:
                    return sample
    return sample


def train_tokenizer(lines: Sequence[str], kind: str, vocab_size: int) -> bytes:
    """Train a sentencepiece model ('bpe' or 'unigram') and return the serialised model."""
    if not lines:
        raise DataError("no text to train the tokenizer on (the training documents are empty)")
    spm.set_random_generator_seed(_TRAIN_SEED)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                       model_type=kind, vocab_size=vocab_size, minloglevel=2,
                                       **TRAINER_OPTIONS)
    except RuntimeError as err:
        # sentencepiece's message reads "INTERNAL: file(line) [check] Human text"; keep the text.
        reason = str(err).split("] ", 1)[-1].strip()
        raise DataError(f"sentencepiece cannot train a {kind} tokenizer with vocab_size={vocab_size} on "
                        f"{sum(map(len, lines)):,} characters: {reason} (change data.vocab_size, or "
                        "give it more text with data.tokenizer_train_chars / more sources)") from None
    return model.getvalue()


class Tokenizer:
    """A trained sentencepiece model: text <-> token ids."""

    def __init__(self, model: bytes):
        self._model = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self.sha256 = hashlib.sha256(model).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes())

    @property
    def model(self) -> bytes:
        """The serialised sentencepiece model."""
        return self._model

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._model)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_texts(self, texts: Sequence[str], by_line: bool = False) -> List[List[int]]:
        """Each text's ids as `encode` gives them, computed in this thread only.

        by_line encodes every line on its own and joins the lines' ids with the newline's. For a
        BPE model that is exactly `encode(text)`: no piece holds a newline (the tokenizer trains on
        lines), so no merge crosses one. It is also faster on long texts, as sentencepiece slows
        down on long inputs. A unigram model must not use it: its best segmentation can break a
        tie between equal-scoring pieces differently when the text is cut.
        """
        if not by_line:
            return self._sp.encode(list(texts), num_threads=1)
        lines = [text.split("\n") for text in texts]
        flat = iter(self._sp.encode([line for text in lines for line in text], num_threads=1))
        newline = self._sp.encode("\n")
        out = []
        for text in lines:
            ids = list(next(flat))
            for _ in range(len(text) - 1):
                ids += newline
                ids += next(flat)
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._sp.decode(ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids])
