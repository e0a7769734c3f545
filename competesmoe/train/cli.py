"""`competesmoe-train CONFIG [key=value ...]` (also `python -m competesmoe.train`)."""
from __future__ import annotations

import argparse
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
