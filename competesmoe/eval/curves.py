"""Curves of a training run read from its metrics.jsonl, and their mean ± std over seeds.

Training lines (with "loss") cover the steps since the previous training line and carry per-step
averages over them: `model_flops` (training FLOPs without competition) and `competition_flops`
(the all-expert passes), and per-layer routing statistics. Validation lines carry `val_loss` at
their step. Cumulative training FLOPs at a step add window length x (model + competition) FLOPs
over the training lines up to it; validation steps are log steps (eval_every is a multiple of
log_every in the quality study), elsewhere the cumulative FLOPs are interpolated linearly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from competesmoe.errors import CompeteSMoEError

Curve = tuple[np.ndarray, np.ndarray]  # x, y
Band = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, mean, std


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CompeteSMoEError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return records


def training_lines(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


def cumulative_flops(records: Sequence[dict]) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(steps, training FLOPs spent by the end of each step) at step 0 and every training line; the
    competition part separately as a third array. None for metrics without `model_flops`."""
    lines = training_lines(records)
    if not lines or any(r.get("model_flops") is None for r in lines):
        return None
    steps, total, comp = [0], [0.0], [0.0]
    for r in lines:
        window = r["step"] - steps[-1]
        total.append(total[-1] + window * (r["model_flops"] + (r.get("competition_flops") or 0.0)))
        comp.append(comp[-1] + window * (r.get("competition_flops") or 0.0))
        steps.append(r["step"])
    return np.array(steps), np.array(total), np.array(comp)


def flops_at(records: Sequence[dict], steps: Sequence[int]) -> Optional[np.ndarray]:
    flops = cumulative_flops(records)
    if flops is None:
        return None
    return np.interp(np.asarray(steps, dtype=float), flops[0], flops[1])


def competition_fraction(records: Sequence[dict]) -> Optional[Curve]:
    """(steps, fraction of the training FLOPs so far spent on competition)."""
    flops = cumulative_flops(records)
    if flops is None:
        return None
    steps, total, comp = flops
    return steps[1:], comp[1:] / total[1:]


def val_curve(records: Sequence[dict]) -> Curve:
    """(steps, validation loss); a step validated twice (a resumed run) keeps its last value."""
    points = {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}
    steps = sorted(points)
    return np.array(steps), np.array([points[s] for s in steps])


def layer_mean_curve(records: Sequence[dict], key: str) -> Curve:
    """(steps, mean over the layers that have it) of a per-layer routing statistic of the training
    lines (agreement, s_entropy, ... are None where a layer did not compete in that window)."""
    steps, values = [], []
    for r in training_lines(records):
        layers = [v for v in (r.get("routing") or {}).get(key) or [] if v is not None]
        if layers:
            steps.append(r["step"])
            values.append(float(np.mean(layers)))
    return np.array(steps), np.array(values)


def load_entropy_curve(records: Sequence[dict]) -> Curve:
    """(steps, entropy of each layer's expert load over the window / ln E, mean over layers): 1 is a
    perfectly even load."""
    steps, values = [], []
    for r in training_lines(records):
        load = (r.get("routing") or {}).get("load")
        if load:
            steps.append(r["step"])
            values.append(float(np.mean([normalized_entropy(layer) for layer in load])))
    return np.array(steps), np.array(values)


def normalized_entropy(fractions: Sequence[float]) -> float:
    p = np.asarray(fractions, dtype=float)
    p = p / p.sum()
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / math.log(len(p))) if len(p) > 1 else 1.0


def band(curves: Sequence[Curve]) -> Band:
    """(x, mean, sample std) over runs (std 0 for one run), on the x values any of them has within the
    range all of them cover; a run without a point there is interpolated linearly. Runs logged at
    the same x (the usual case) are compared point by point; runs that end a few steps apart
    (smoe_flops over seeds) keep the last point they all reach."""
    curves = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves if len(x)]
    if not curves:
        return np.array([]), np.array([]), np.array([])
    low, high = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    xs = np.unique(np.concatenate([x[(x >= low) & (x <= high)] for x, _ in curves]))
    ys = np.array([np.interp(xs, x, y) for x, y in curves])
    std = ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
    return xs, ys.mean(0), std


def interpolate(x: np.ndarray, y: np.ndarray, at: float) -> Optional[float]:
    """y at `at`, linear between the neighbouring points of an increasing x; None outside them."""
    if len(x) == 0 or at < x[0] or at > x[-1]:
        return None
    return float(np.interp(at, x, y))
