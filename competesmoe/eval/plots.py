"""`competesmoe-plot`: figures (PNG) of training runs from their metrics.jsonl and routing reports.

    competesmoe-plot RUN_DIR [RUN_DIR ...] --out DIR [--routing REPORT.json ...]
    competesmoe-plot --group NAME RUN_DIR [RUN_DIR ...] [--group NAME ...] --out DIR

writes to DIR
  loss.png                      training and validation loss of all runs on one figure;
  <run>_expert_load.png         per MoE layer, the load of each expert over the logged steps (heatmap);
  <run>_competition.png         competing layers per step, s mean and std, entropy of softmax(s),
                                router/competition agreement over steps (runs that competed);
  <report>_over_checkpoints.png  from a `competesmoe-eval routing --out REPORT.json` report: expert
                                change rate between consecutive checkpoints, load imbalance and
                                forced-competition agreement per checkpoint;
with --group (runs of one arm over several seeds; mean ± sample std bands over its runs):
  groups_loss.png               validation loss against steps and against training FLOPs (competition
                                included), and each group's difference to the first group's mean;
  groups_routing.png            router/competition agreement, entropy gap ln E - H(p^C) of the
                                distillation target, expert load entropy / ln E, share of training FLOPs
                                spent on competition, and the expert change rate between checkpoints
                                of runs that hold a routing report RUN_DIR/routing.json
                                (`competesmoe-eval routing RUN_DIR --out RUN_DIR/routing.json`).
Figures are drawn with matplotlib's object API on the Agg canvas (no display, no global backend).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from competesmoe.errors import CompeteSMoEError, cli_main
from competesmoe.eval import curves
from competesmoe.eval.curves import read_metrics


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its path with / replaced when names repeat."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(r)).strip("/").replace("/", "_") for r in run_dirs]


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _routing_records(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if r.get("routing")]


def _layer_series(records: Sequence[dict], key: str) -> tuple[list[int], np.ndarray]:
    """Steps and a [steps, layers] array of a per-layer routing statistic (NaN where a layer did
    not compete in that window)."""
    rows = _routing_records(records)
    values = np.array([[np.nan if v is None else v for v in r["routing"][key]] for r in rows], dtype=float)
    return [r["step"] for r in rows], values


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_losses(runs: dict[str, list[dict]], path: Path) -> Path:
    fig = Figure(figsize=(11, 4))
    train_ax, val_ax = fig.subplots(1, 2)
    for name, records in runs.items():
        train_ax.plot(*_series(records, "loss"), label=name, linewidth=1)
        val_ax.plot(*_series(records, "val_loss"), marker="o", label=name)
    for ax, title in ((train_ax, "training loss"), (val_ax, "validation loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    train_ax.legend(fontsize="small")
    return _save(fig, path)


def plot_expert_load(records: Sequence[dict], path: Path, title: str) -> Optional[Path]:
    rows = _routing_records(records)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    load = np.array([r["routing"]["load"] for r in rows], dtype=float)  # [steps, layers, experts]
    n_layers, n_experts = load.shape[1], load.shape[2]
    # Each column is centred on its step (the logged window ending there).
    half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
    fig = Figure(figsize=(10, 2.2 * n_layers + 0.6))
    axes = np.atleast_1d(fig.subplots(n_layers, 1, sharex=True))
    image = None
    for layer, ax in enumerate(axes):
        image = ax.imshow(load[:, layer, :].T, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                          vmax=max(float(load.max()), 1e-9), interpolation="nearest",
                          extent=(steps[0] - half, steps[-1] + half, -0.5, n_experts - 0.5))
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1].set_xlabel("step")
    fig.colorbar(image, ax=list(axes), label="fraction of assignments")
    fig.suptitle(f"{title}: expert load per MoE layer")
    return _save(fig, path)


def plot_competition(records: Sequence[dict], path: Path, title: str) -> Optional[Path]:
    """None when the run never competed (not CompeteSMoE, or competition switched off)."""
    competing = _series(records, "competing_layers")
    if not any(competing[1]):
        return None
    fig = Figure(figsize=(11, 7))
    (count_ax, s_ax), (entropy_ax, agree_ax) = fig.subplots(2, 2, sharex=True)
    count_ax.plot(*competing, linewidth=1)
    count_ax.set_title("competing layers per step")
    steps, s_mean = _layer_series(records, "s_mean")
    _, s_std = _layer_series(records, "s_std")
    _, entropy = _layer_series(records, "s_entropy")
    _, agreement = _layer_series(records, "agreement")
    for layer in range(s_mean.shape[1]):
        shown = ~np.isnan(s_mean[:, layer])
        x = np.array(steps)[shown]
        line, = s_ax.plot(x, s_mean[shown, layer], marker=".", label=f"layer {layer}")
        s_ax.fill_between(x, (s_mean - s_std)[shown, layer], (s_mean + s_std)[shown, layer],
                          color=line.get_color(), alpha=0.2)
        entropy_ax.plot(x, entropy[shown, layer], marker=".")
        agree_ax.plot(x, agreement[shown, layer], marker=".")
    s_ax.set_title("neural response s: mean ± std")
    entropy_ax.set_title("entropy of softmax(s)")
    agree_ax.set_title("router / competition agreement |T^R ∩ T^C| / K")
    s_ax.legend(fontsize="small")
    for ax in (count_ax, s_ax, entropy_ax, agree_ax):
        ax.grid(alpha=0.3)
    for ax in (entropy_ax, agree_ax):
        ax.set_xlabel("step")
    fig.suptitle(f"{title}: competition statistics (logged windows in which a layer competed)")
    return _save(fig, path)


def plot_routing_report(report: dict, path: Path, title: str) -> Path:
    checkpoints = report["checkpoints"]
    has_competition = any(c["competition"] for c in checkpoints)
    fig = Figure(figsize=(5.5 * (3 if has_competition else 2), 4))
    axes = fig.subplots(1, 3 if has_competition else 2)
    ecr_ax, load_ax = axes[0], axes[1]
    rates = report["change_rate"]
    n_layers = len(checkpoints[0]["load"]) if checkpoints else 0
    for layer in range(n_layers):
        line, = ecr_ax.plot([r["to"] for r in rates], [r["top1"][layer] for r in rates], marker="o",
                            label=f"layer {layer} top-1")
        ecr_ax.plot([r["to"] for r in rates], [r["topk"][layer] for r in rates], marker="s", linestyle="--",
                    color=line.get_color(), label=f"layer {layer} top-K")
        load_ax.plot([c["step"] for c in checkpoints], [c["load_max_over_mean"][layer] for c in checkpoints],
                     marker="o", label=f"layer {layer}")
        if has_competition:
            axes[2].plot([c["step"] for c in checkpoints], [c["competition"]["agreement"][layer] for c in checkpoints],
                         marker="o", label=f"layer {layer}")
    ecr_ax.set_title("expert change rate since the previous checkpoint")
    load_ax.set_title("load imbalance (max / mean expert load)")
    if has_competition:
        axes[2].set_title("forced-competition agreement")
    for ax in axes:
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3)
    ecr_ax.legend(fontsize="x-small")
    fig.suptitle(f"{title}: routing on {report.get('eval_tokens', 0):,} validation tokens", y=1.04)
    return _save(fig, path)


def _draw_band(ax, xs, mean, std, label, color=None):
    line, = ax.plot(xs, mean, label=label, color=color, linewidth=1.3)
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    return line.get_color()


def _zoom_to_late_training(ax, bands: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], start: float = 0.25):
    """Loss curves fall steeply at first: show the range of the bands after `start` of the x range."""
    late = [(m - s)[x >= start * x[-1]].tolist() + (m + s)[x >= start * x[-1]].tolist() for x, m, s in bands if len(x)]
    values = [v for group in late for v in group]
    if values:
        low, high = min(values), max(values)
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)


def plot_group_losses(groups: dict[str, list[list[dict]]], path: Path) -> Path:
    fig = Figure(figsize=(16, 4.5))
    step_ax, flops_ax, diff_ax = fig.subplots(1, 3)
    step_bands, flop_bands, diff_bands, reference = [], [], [], None
    for i, (name, runs) in enumerate(groups.items()):
        vals = [curves.val_curve(r) for r in runs]
        steps, mean, std = curves.band(vals)
        color = _draw_band(step_ax, steps, mean, std, f"{name} (n={len(runs)})", f"C{i}")
        step_bands.append((steps, mean, std))
        flops = [curves.flops_at(r, v[0]) for r, v in zip(runs, vals)]
        if all(f is not None for f in flops) and len(steps):
            x = curves.band([(v[0], f) for v, f in zip(vals, flops)])[1]
            _draw_band(flops_ax, x, mean, std, name, color)
            flop_bands.append((x, mean, std))
        if reference is None:
            reference = (steps, mean)
        shared = np.isin(steps, reference[0])
        base = reference[1][np.isin(reference[0], steps)]
        diff_bands.append((steps[shared], mean[shared] - base, std[shared]))
        _draw_band(diff_ax, *diff_bands[-1], name, color)
    _zoom_to_late_training(step_ax, step_bands)
    _zoom_to_late_training(flops_ax, flop_bands)
    _zoom_to_late_training(diff_ax, diff_bands)
    step_ax.set_xlabel("step")
    flops_ax.set_xlabel("training FLOPs (competition included)")
    diff_ax.set_xlabel("step")
    step_ax.set_title("validation loss (mean ± std over seeds)")
    flops_ax.set_title("validation loss against training compute")
    diff_ax.set_title(f"difference to {next(iter(groups))}'s mean (band: the group's std)")
    diff_ax.axhline(0.0, color="black", linewidth=0.6)
    for ax in (step_ax, flops_ax, diff_ax):
        ax.grid(alpha=0.3)
    step_ax.legend(fontsize="small")
    return _save(fig, path)


def _change_rate_curve(run_dir: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    path = Path(run_dir) / "routing.json"
    if not path.is_file():
        return None
    rates = json.loads(path.read_text()).get("change_rate") or []
    return np.array([r["to"] for r in rates]), np.array([float(np.mean(r["topk"])) for r in rates])


def plot_group_routing(groups: dict[str, list[list[dict]]], run_dirs: dict[str, list[Path]], path: Path) -> Path:
    fig = Figure(figsize=(16, 8.5))
    axes = fig.subplots(2, 3).ravel()
    titles = ["router / competition agreement |T^R ∩ T^C| / K (mean over layers)",
              "ln E - H(p^C): how far the distillation target is from uniform",
              "expert load entropy / ln E (mean over layers)",
              "share of training FLOPs spent on competition (cumulative)",
              "expert change rate between checkpoints (top-K, mean over layers)",
              "training loss (mean ± std)"]
    for i, (name, runs) in enumerate(groups.items()):
        color = f"C{i}"  # the same colour for a group in every panel and in groups_loss.png
        n_experts = [len(r["routing"]["load"][0]) for records in runs for r in curves.training_lines(records)
                     if r.get("routing")][:1]
        entropy_gap = []
        for records in runs:
            x, h = curves.layer_mean_curve(records, "s_entropy")
            entropy_gap.append((x, math.log(n_experts[0]) - h) if n_experts else (x, h))
        fraction = [curves.competition_fraction(r) for r in runs]
        ecr = [_change_rate_curve(d) for d in run_dirs[name]]
        train = [(np.array([r["step"] for r in curves.training_lines(records)]),
                  np.array([r["loss"] if r["loss"] is not None else np.nan for r in curves.training_lines(records)]))
                 for records in runs]
        panels = [[curves.layer_mean_curve(r, "agreement") for r in runs], entropy_gap,
                  [curves.load_entropy_curve(r) for r in runs],
                  fraction if all(f is not None for f in fraction) else [],
                  ecr if all(e is not None for e in ecr) else [], train]
        for ax, panel in zip(axes, panels):
            xs, mean, std = curves.band([c for c in panel if len(c[0])])
            if len(xs):
                _draw_band(ax, xs, mean, std, name, color)
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[4].set_xlabel("checkpoint step")
    axes[5].legend(fontsize="small")  # every group has a training loss
    fig.suptitle("routing statistics of the groups (mean ± std over their runs; windows in which layers competed)")
    return _save(fig, path)


def plot_groups(groups: dict[str, Sequence[Path]], out: Path) -> list[Path]:
    """The --group figures of the module docstring."""
    metrics = {name: [read_metrics(d) for d in dirs] for name, dirs in groups.items()}
    run_dirs = {name: [Path(d) for d in dirs] for name, dirs in groups.items()}
    return [plot_group_losses(metrics, out / "groups_loss.png"),
            plot_group_routing(metrics, run_dirs, out / "groups_routing.png")]


def plot_runs(run_dirs: Sequence[Path], out: Path, routing_reports: Sequence[Path] = (),
              log: Callable[[str], None] = print) -> list[Path]:
    """Every figure of the module docstring; returns the files written."""
    runs = {name: read_metrics(d) for name, d in zip(run_names(run_dirs), run_dirs)}
    written = [plot_losses(runs, out / "loss.png")]
    for name, records in runs.items():
        for kind, plot in (("expert_load", plot_expert_load), ("competition", plot_competition)):
            figure = plot(records, out / f"{name}_{kind}.png", name)
            if figure is None:
                log(f"competesmoe-plot: {name} has no {kind.replace('_', ' ')} statistics to plot")
            else:
                written.append(figure)
    for report_path in routing_reports:
        try:
            report = json.loads(Path(report_path).read_text())
        except (OSError, ValueError) as err:
            raise CompeteSMoEError(f"cannot read the routing report {report_path}: {err}") from None
        written.append(plot_routing_report(report, out / f"{Path(report_path).stem}_over_checkpoints.png",
                                           Path(report_path).stem))
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="competesmoe-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    parser.add_argument("--routing", nargs="+", type=Path, default=[],
                        help="routing reports written by `competesmoe-eval routing --out`")
    parser.add_argument("--group", nargs="+", action="append", default=[], metavar=("NAME", "RUN_DIR"),
                        help="a named group of runs (e.g. one router over seeds), drawn as mean ± std bands; "
                             "repeatable")
    args = parser.parse_args(argv)
    if not args.runs and not args.group:
        parser.error("give run directories, --group NAME RUN_DIR ..., or both")
    bad = [g[0] for g in args.group if len(g) < 2]
    if bad:
        parser.error(f"--group {bad[0]} names no run directory")

    def run() -> int:
        written = plot_runs(args.runs, args.out, args.routing) if args.runs else []
        if args.group:
            written += plot_groups({g[0]: [Path(d) for d in g[1:]] for g in args.group}, args.out)
        for path in written:
            print(path)
        return 0

    return cli_main(run)


if __name__ == "__main__":
    sys.exit(main())
