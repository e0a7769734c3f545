"""`competesmoe-generate`: continue prompts with a trained checkpoint.

    competesmoe-generate RUN_DIR_OR_CHECKPOINT --prompt "The Congress" [--prompt ...]
                         [--prompt-file FILE] [--max-new-tokens 64] [--temperature 0] [--top-p 1]
                         [--seed 0] [--device auto|cpu|cuda] [--dtype fp32|bf16] [--no-cache]

Greedy by default; --temperature > 0 samples (with --top-p, nucleus sampling), reproducibly for a
given --seed. All prompts run as one batch. Each prompt is read as the start of a document (the
model saw an EOS before every training document, so one is put before the prompt).

Generation runs in one process: a checkpoint written by any data x expert-parallel layout loads
whole into it (competesmoe.train.checkpoint.load_for_inference), so a run trained with expert
parallelism needs no export first. Under torchrun it stops with a message instead of running the
same generation on every rank.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from competesmoe.errors import CompeteSMoEError

DTYPES = ("fp32", "bf16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="competesmoe-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", type=Path, help="more prompts, one per line")
    p.add_argument("--max-new-tokens", type=_at_least(1, int), default=64)
    p.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    return p


def _at_least(low, kind):
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise CompeteSMoEError(f"--prompt-file {args.prompt_file} does not exist")
        prompts += [line for line in args.prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CompeteSMoEError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise CompeteSMoEError(
                "competesmoe-generate runs in one process: start it with plain python/the console script, "
                "not torchrun (a checkpoint of any data x expert-parallel layout loads whole into one "
                "process, so no export is needed first)")
        if not 0.0 < args.top_p <= 1.0:
            raise CompeteSMoEError(f"--top-p must be in (0, 1], got {args.top_p}")
        prompts = _prompts(args)
        import torch

        from competesmoe.model.generate import Sampling, generate
        from competesmoe.parallel.mesh import pick_device
        from competesmoe.train.checkpoint import load_for_inference, resolve_checkpoint

        checkpoint = resolve_checkpoint(args.path)
        device = pick_device(args.device)
        cfg, model, tokenizer = load_for_inference(checkpoint, device)
        model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except CompeteSMoEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    sampling = Sampling(args.temperature, args.top_p, args.seed)
    ids = [[tokenizer.eos_id] + tokenizer.encode(p) for p in prompts]
    start = time.perf_counter()
    new = generate(model, ids, args.max_new_tokens, tokenizer.eos_id, sampling, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    mode = ("greedy" if args.temperature == 0
            else f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}")
    print(f"generate: {checkpoint} (router {cfg.model.moe.router}) on {device}, {mode}; "
          f"{sum(map(len, new))} new tokens in {seconds:.2f} s")
    for i, (prompt, tokens) in enumerate(zip(prompts, new)):
        print(f"--- sample {i + 1}")
        print(prompt + tokenizer.decode(tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
