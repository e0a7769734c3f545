"""Where training metrics go: `<run.dir>/metrics.jsonl`, the console, and wandb when configured.

Every JSON line has `step`; training lines have `loss`, validation lines `val_loss`. The console
shows a progress bar in an interactive terminal and plain log lines otherwise.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from competesmoe.train.config import RunConfig


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of steps after `step`: a resumed run recomputes them, and must not leave
    the lines of a crashed attempt behind."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, run_dir: Path, cfg: RunConfig, total_steps: int, start_step: int,
                 config: Optional[dict] = None):
        self.path = run_dir / "metrics.jsonl"
        truncate_after(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        use_bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.wandb = None
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir),
                                    config=config, resume="allow", name=run_dir.name)

    def write(self, record: dict, summary: str) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log(flat, step=record["step"])
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
            if "val_loss" in record:
                self.bar.write(summary)
        else:
            print(summary, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()
