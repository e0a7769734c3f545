"""`competesmoe-train CONFIG [key=value ...]` (also `python -m competesmoe.train`).

Exit codes: 0 done; 2 bad input (one `error:` line); 3 stopped because training diverged
(train.nonfinite); 42 stopped by a signal with a checkpoint (the launchers requeue on it).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from competesmoe.errors import cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="competesmoe-train",
        description="Pre-train a MoE LM. Rerunning with the same run.dir resumes from its latest checkpoint.")
    parser.add_argument("config", help="YAML config, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    return cli_main(lambda: _train(args.config, args.overrides))


def _train(config: str, overrides: list[str]) -> int:
    from competesmoe.config import load_config
    from competesmoe.train.trainer import REQUEUE_EXIT_CODE, train

    result = train(load_config(config, overrides))
    if result.stopped_early:
        return REQUEUE_EXIT_CODE
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(result)
    return 0


def _print_summary(result) -> None:
    print(f"done: step {result.step}", end="")
    if result.val_loss is not None and math.isfinite(result.val_loss):
        print(f"; validation loss {result.val_loss:.4f}, perplexity {math.exp(min(result.val_loss, 50)):.2f}", end="")
    latest = result.run_dir / "checkpoints" / "latest"
    print(f"\nmetrics:     {result.run_dir / 'metrics.jsonl'}")
    if latest.is_file():
        print(f"checkpoints: {result.run_dir / 'checkpoints'} (latest: {latest.read_text().strip()})")


if __name__ == "__main__":
    sys.exit(main())
