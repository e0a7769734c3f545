"""Train under torchrun with the adaptive competition budget; each rank records, per step, the
layers that competed, its own agreement (before the reduction over ranks) and the reduced values
the schedule was fed.

usage: torchrun ... tests/workers/adaptive_ranks.py OUT_DIR CONFIG [key=value ...]
writes OUT_DIR/rank<R>.json: [{"compete": [...], "local": [...], "reduced": [...]}, ...] (one per step)
"""
import json
import os
import sys
from pathlib import Path

import competesmoe.train.trainer as trainer
from competesmoe.train.cli import main

out_dir = Path(sys.argv[1])
rank = int(os.environ.get("RANK", 0))
steps = []
reduce_over_ranks = trainer.reduced_agreement


def recorded(out, compete, mesh):
    local = [sum(m[i].agreement.item() for m in out.moe_stats) / len(out.moe_stats) if c else None
             for i, c in enumerate(compete)]
    reduced = reduce_over_ranks(out, compete, mesh)
    steps.append({"compete": list(compete), "local": local, "reduced": reduced})
    return reduced


# Under `if __name__ == "__main__"`: data preparation spawns worker processes, which import
# this file again and must not train.
if __name__ == "__main__":
    trainer.reduced_agreement = recorded
    code = main(sys.argv[2:])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(steps))
    sys.exit(code)
