"""`competesmoe-train CONFIG [key=value ...]` (also `python -m competesmoe.train`)."""
from __future__ import annotations

import argparse
import os
import sys

from competesmoe.errors import CompeteSMoEError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="competesmoe-train",
        description="Pre-train a MoE LM. Rerunning with the same run.dir resumes from its latest checkpoint.")
    parser.add_argument("config", help="YAML config, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        from competesmoe.config import load_config
        from competesmoe.train.trainer import REQUEUE_EXIT_CODE, train

        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except CompeteSMoEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.stopped_early:
        return REQUEUE_EXIT_CODE
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(result)
    return 0


def _print_summary(result) -> None:
    import math

    print(f"done: step {result.step}", end="")
    if result.val_loss is not None:
        print(f"; validation loss {result.val_loss:.4f}, perplexity {math.exp(min(result.val_loss, 50)):.2f}", end="")
    latest = result.run_dir / "checkpoints" / "latest"
    print(f"\nmetrics:     {result.run_dir / 'metrics.jsonl'}")
    if latest.is_file():
        print(f"checkpoints: {result.run_dir / 'checkpoints'} (latest: {latest.read_text().strip()})")


if __name__ == "__main__":
    sys.exit(main())
