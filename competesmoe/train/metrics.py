"""Training metrics: what a log line holds, and where it goes.

`LogWindow` sums what happened between two log lines (losses, tokens, skipped steps, the MoE
layers' routing statistics) on the device, and turns it into a record at each log step. Its sums
are saved in checkpoints, so a run stopped and resumed mid-window writes the same lines as an
uninterrupted one.

`MetricsWriter` appends records to `<run.dir>/metrics.jsonl` (strict JSON: a value that is not
finite is written as null and its key listed under "nonfinite"), to the console (a progress bar
in an interactive terminal, log lines otherwise) and to wandb when configured. Every line has
`step`; training lines have `loss`, validation lines `val_loss`.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from competesmoe.model.moe.layer import MoEStats
from competesmoe.parallel.mesh import Mesh
from competesmoe.progress import Progress
from competesmoe.train.config import RunConfig

# Dense bf16 matmul peaks (FLOP/s) for MFU; devices not listed report no MFU.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

# The competition statistics a log line averages over a layer's competing forwards.
_COMPETITION_STATS = ("s_mean", "s_std", "s_entropy", "agreement")


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


class RoutingLog:
    """The MoE layers' statistics over the forwards of one log window, kept on the device."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.load: list[Optional[torch.Tensor]] = [None] * n_layers
        self.competed = [0] * n_layers
        self.weight_exchanges = [0] * n_layers  # competing forwards that gathered the experts' weights
        self.forwards = 0
        self.comp: list[dict[str, list[torch.Tensor]]] = [{k: [] for k in _COMPETITION_STATS} for _ in range(n_layers)]
        self.competition_flops = 0.0

    def add(self, stats: list[MoEStats]) -> None:
        self.forwards += 1
        for i, s in enumerate(stats):
            self.load[i] = s.load if self.load[i] is None else self.load[i] + s.load
            if s.competed:
                self.competed[i] += 1
                self.weight_exchanges[i] += s.exchange == "weights"
                for key in _COMPETITION_STATS:
                    self.comp[i][key].append(getattr(s, key))
                self.competition_flops += s.competition_flops

    def summary(self, mesh: Mesh) -> dict:
        """Collective under several processes: expert loads are summed over ranks."""
        if not self.n_layers or self.load[0] is None:
            return {}
        load = torch.stack(self.load).float()
        if mesh.distributed:
            dist.all_reduce(load)
        frac = load / load.sum(-1, keepdim=True)

        def mean_of(key):
            return [torch.stack(c[key]).mean().item() if c[key] else None for c in self.comp]

        out = {"competed": [c / max(self.forwards, 1) for c in self.competed], "load": frac.tolist(),
               "load_max_over_mean": (frac.max(-1).values * frac.shape[-1]).tolist(),
               # the fraction of a layer's competing forwards that took the weight exchange
               "weight_exchange": [w / c if c else None for w, c in zip(self.weight_exchanges, self.competed)]}
        out.update({key: mean_of(key) for key in _COMPETITION_STATS})
        return out

    def state_dict(self) -> dict:
        return {"load": [None if t is None else t.tolist() for t in self.load], "competed": self.competed,
                "weight_exchanges": self.weight_exchanges,
                "forwards": self.forwards, "competition_flops": self.competition_flops,
                "comp": [{k: [v.item() for v in c[k]] for k in _COMPETITION_STATS} for c in self.comp]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.load = [None if v is None else torch.tensor(v, dtype=torch.int64, device=device) for v in state["load"]]
        self.competed, self.forwards = list(state["competed"]), state["forwards"]
        # checkpoints written before the exchange was counted: none of their forwards is known
        self.weight_exchanges = list(state.get("weight_exchanges", [0] * self.n_layers))
        self.competition_flops = state["competition_flops"]
        self.comp = [{k: [torch.tensor(v, dtype=torch.float32, device=device) for v in c[k]]
                      for k in _COMPETITION_STATS} for c in state["comp"]]


class LogWindow:
    """What the steps since the last log line did. Losses of skipped (non-finite) steps are not
    part of the averages; the line counts those steps instead."""

    def __init__(self, n_layers: int, device: torch.device):
        self.device = device
        self.losses = torch.zeros(2, device=device)  # task loss, aux loss: sums over applied steps
        self.applied = 0
        self.skipped = 0
        self.tokens = 0
        self.competing = 0  # competing layer-steps
        self.routing = RoutingLog(n_layers)
        self.start = time.perf_counter()

    @property
    def steps(self) -> int:
        return self.applied + self.skipped

    def add_step(self, loss: torch.Tensor, aux: torch.Tensor, applied: bool, tokens: int, competing: int) -> None:
        if applied:
            self.losses += torch.stack([loss, aux])
            self.applied += 1
        else:
            self.skipped += 1
        self.tokens += tokens
        self.competing += competing

    def record(self, step: int, lr: float, grad_norm: float, mesh: Mesh, flops_per_token: float,
               peak: Optional[float]) -> dict:
        """The log line of this window (collective under several processes)."""
        means = self.losses / self.applied if self.applied else torch.full((2,), math.nan, device=self.device)
        if mesh.distributed:
            dist.all_reduce(means)
            means /= mesh.world
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        # Competition FLOPs per step over all ranks (each rank counts its own tokens).
        comp_flops = self.routing.competition_flops / self.steps * mesh.world
        loss, aux = means.tolist()
        # Training FLOPs per step without competition (self.tokens counts all ranks' tokens).
        model_flops = flops_per_token * self.tokens / self.steps
        record = {"step": step, "loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "competing_layers": self.competing / self.steps,
                  "model_flops": model_flops, "competition_flops": comp_flops, "skipped_steps": self.skipped,
                  "routing": self.routing.summary(mesh)}
        if peak:
            record["mfu"] = (flops_per_token * tokens_per_s + comp_flops * self.steps / elapsed) / (peak * mesh.world)
        return record

    def state_dict(self) -> dict:
        loss, aux = self.losses.tolist()
        return {"loss": loss, "aux": aux, "applied": self.applied, "skipped": self.skipped, "tokens": self.tokens,
                "competing": self.competing, "routing": self.routing.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.losses = torch.tensor([state["loss"], state["aux"]], dtype=torch.float32, device=self.device)
        self.applied, self.skipped = state["applied"], state["skipped"]
        self.tokens, self.competing = state["tokens"], state["competing"]
        self.routing.load_state_dict(state["routing"], self.device)


def strict_json(record: dict) -> str:
    """One JSON line in which every non-finite float is null and its dotted key is listed under
    "nonfinite" (bare NaN/Infinity are not JSON)."""
    bad: list[str] = []

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if bad:
        out["nonfinite"] = bad
    return json.dumps(out, allow_nan=False)


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
    """Appends records to metrics.jsonl, shows their summaries (train/progress display) and logs
    them to wandb when configured. Used on the first rank only."""

    def __init__(self, run_dir: Path, cfg: RunConfig, total_steps: int, start_step: int,
                 config: Optional[dict] = None):
        self.path = run_dir / "metrics.jsonl"
        truncate_after(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        bar = {"bar": True, "log": False, "auto": None}[cfg.progress]
        self.display = Progress(total_steps, "train", unit="step", initial=start_step, bar=bar,
                                percent_lines=False, log=lambda line: print(line, flush=True))
        self.wandb = None
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir),
                                    config=config, resume="allow", name=run_dir.name)

    def write(self, record: dict, summary: str) -> None:
        """A record; its summary is the bar's status (a line of its own for validation records,
        and for every record when there is no bar)."""
        self.file.write(strict_json(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log(flat, step=record["step"])
        self.display.status(summary)
        if "val_loss" in record or not self.display.has_bar:
            self.display.write(summary)

    def advance(self, steps: int = 1) -> None:
        self.display.update(steps)

    def message(self, text: str) -> None:
        self.display.write(text)

    def close(self) -> None:
        self.display.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()
