"""The quality study's arithmetic (tools/quality_benchmark.py) and its figures, on synthetic runs."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from competesmoe.eval import curves
from competesmoe.eval.plots import main as plot_main

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "tools" / "quality_benchmark.py")
study = importlib.util.module_from_spec(spec)
sys.modules["quality_benchmark"] = study  # dataclasses look their module up
spec.loader.exec_module(study)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_metrics(final_loss, competition_flops=0.0, steps=40, log_every=10, eval_every=20, experts=4):
    """Metrics lines as the trainer writes them: training lines every log_every steps, validation
    lines every eval_every steps, a loss falling to final_loss."""
    records = [{"step": 0, "val_loss": 8.0}]
    for step in range(log_every, steps + 1, log_every):
        competed = competition_flops > 0
        records.append({
            "step": step, "loss": final_loss + 1.0 - step / steps, "model_flops": 1e9, "tokens_per_s": 1000.0,
            "competition_flops": competition_flops, "competing_layers": 0.5 if competed else 0.0,
            "routing": {"load": [[1 / experts] * experts, [0.7] + [0.1] * (experts - 1)],
                        "agreement": [0.4, None] if competed else [None, None],
                        "s_entropy": [math.log(experts) - 0.001, None] if competed else [None, None]}})
        if step % eval_every == 0:
            records.append({"step": step, "val_loss": final_loss + 0.5 * (1 - step / steps)})
    return records


def test_cumulative_flops_and_curves_by_hand():
    records = synthetic_metrics(5.0, competition_flops=2e8)
    steps, total, comp = curves.cumulative_flops(records)
    assert steps.tolist() == [0, 10, 20, 30, 40]
    assert total.tolist() == [0.0, 1.2e10, 2.4e10, 3.6e10, 4.8e10] and comp[-1] == 40 * 2e8
    assert curves.flops_at(records, [20, 25]).tolist() == [2.4e10, 3.0e10]
    assert curves.competition_fraction(records)[1].tolist() == pytest.approx([2e8 / 1.2e9] * 4)
    assert curves.val_curve(records)[0].tolist() == [0, 20, 40]
    x, y = curves.layer_mean_curve(records, "agreement")  # the None layer is left out of the mean
    assert x.tolist() == [10, 20, 30, 40] and y.tolist() == [0.4] * 4
    even = curves.normalized_entropy([0.25] * 4)
    skewed = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)) / math.log(4)
    assert curves.load_entropy_curve(records)[1].tolist() == pytest.approx([(even + skewed) / 2] * 4)
    xs, mean, std = curves.band([(np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0])),
                                 (np.array([1, 2, 3]), np.array([4.0, 6.0, 8.0]))])
    assert xs.tolist() == [1, 2] and mean.tolist() == [3.0, 4.5]
    assert std.tolist() == pytest.approx([np.std([2, 4], ddof=1), np.std([3, 6], ddof=1)])
    # runs that end apart: the band reaches the shorter one's end, the longer one interpolated there
    xs, mean, _ = curves.band([(np.array([0, 10, 43]), np.array([3.0, 2.0, 1.0])),
                               (np.array([0, 10, 45]), np.array([3.0, 2.0, 1.0]))])
    assert xs.tolist() == [0, 10, 43] and mean[-1] == pytest.approx((1.0 + (2.0 - 33 / 35)) / 2)


def test_difference_welch_and_paired_by_hand():
    a, b = [(0, 5.0), (1, 5.2), (2, 5.1)], [(0, 4.9), (1, 5.0), (2, 5.05)]
    d = study.difference(a, b)
    va, vb = [5.0, 5.2, 5.1], [4.9, 5.0, 5.05]
    assert d["diff"] == pytest.approx(np.mean(vb) - np.mean(va))
    assert d["se"] == pytest.approx(math.sqrt(np.var(va, ddof=1) / 3 + np.var(vb, ddof=1) / 3))
    paired = np.array(vb) - np.array(va)
    assert d["paired_diff"] == pytest.approx(paired.mean())
    assert d["paired_se"] == pytest.approx(paired.std(ddof=1) / math.sqrt(3))
    qa, qb = np.var(va, ddof=1) / 3, np.var(vb, ddof=1) / 3
    assert d["df"] == pytest.approx((qa + qb) ** 2 / (qa ** 2 / 2 + qb ** 2 / 2))  # Welch-Satterthwaite
    assert d["resolved"] == (abs(d["diff"]) > study.t95(d["df"]) * d["se"])
    assert d["paired_resolved"] == (abs(paired.mean()) > 4.303 * d["paired_se"])  # t_0.975 with 2 df
    assert study.t95(2) == 4.303 and study.t95(2.9) == 4.303 and study.t95(1000) == 1.98
    assert study.difference(a[:1], b) is None


def summary(arm, seed, loss, flops, curve_flops=None, curve=None):
    return {"arm": arm, "seed": seed, "flops": {"total": flops, "competition": 0.0, "competition_share": 0.0},
            "results": {"val": {"status": "ok", "loss": loss, "ppl": math.exp(loss)}},
            "val_curve": [[0, 100, 200], curve or [8.0, 6.0, loss]], "val_curve_flops": curve_flops,
            "competing_layers": 0.0, "agreement_late": None, "target_entropy_gap_late": None,
            "load_entropy_late": None}


def test_equal_flops_interpolates_smoe_in_log_flops():
    rows = []
    for seed, (l0, l1, lx) in enumerate([(5.0, 4.8, 4.85), (5.1, 4.9, 4.95)]):
        rows += [summary("smoe", seed, l0, 100.0), summary("smoe_flops", seed, l1, 120.0),
                 summary("competesmoe", seed, lx, 110.0, curve_flops=[0.0, 55.0, 110.0], curve=[8.0, 6.0, lx])]
    out = study.equal_flops(rows, ["smoe", "competesmoe", "smoe_flops"])["competesmoe"]
    w = math.log(110 / 100) / math.log(120 / 100)
    want = [lx - (l0 + w * (l1 - l0)) for l0, l1, lx in [(5.0, 4.8, 4.85), (5.1, 4.9, 4.95)]]
    assert [r["loss"] - r["smoe_at_flops"] for r in out["end_of_training"]] == pytest.approx(want)
    assert out["end_of_training_diff"]["mean"] == pytest.approx(np.mean(want))
    # along the curve: competesmoe's curve at SMoE's final 100 FLOPs, between (55, 6.0) and (110, lx)
    along = [6.0 + (100 - 55) / 55 * (lx - 6.0) for lx in (4.85, 4.95)]
    assert [r["loss_along_curve"] for r in out["along_curve"]] == pytest.approx(along)
    assert out["along_curve_diff"]["mean"] == pytest.approx(np.mean([along[0] - 5.0, along[1] - 5.1]))


def test_flop_matched_arm_gets_the_steps_competition_buys(tmp_path):
    args = study.parse_args(["--arms", "smoe,competesmoe,smoe_flops", "--seeds", "0", "--steps", "200",
                             "--runs-dir", str(tmp_path)])
    runs = {r.arm: r for r in study.plan(args)}
    per_step = runs["smoe"].flops / 200
    assert runs["competesmoe"].flops > runs["smoe"].flops  # competition was counted
    assert runs["smoe_flops"].steps == round(runs["competesmoe"].flops / per_step)
    assert abs(runs["smoe_flops"].flops - runs["competesmoe"].flops) <= per_step / 2
    assert "train.eval_every=20" in runs["smoe_flops"].overrides  # the same validation steps as the others


def test_group_figures(tmp_path, capsys):
    groups = []
    for arm, loss, comp in (("smoe", 5.0, 0.0), ("competesmoe", 4.9, 2e8)):
        dirs = []
        for seed in range(2):
            run = tmp_path / arm / f"seed{seed}"
            run.mkdir(parents=True)
            lines = synthetic_metrics(loss + 0.01 * seed, competition_flops=comp)
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            report = {"change_rate": [{"from": 20, "to": 40, "top1": [0.2, 0.3], "topk": [0.1, 0.2]}]}
            (run / "routing.json").write_text(json.dumps(report))
            dirs.append(str(run))
        groups += ["--group", arm, *dirs]
    assert plot_main(["--out", str(tmp_path / "plots"), *groups]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(p.name for p in written) == ["groups_loss.png", "groups_routing.png"]
    for png in written:
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 20_000
    with pytest.raises(SystemExit):
        plot_main(["--out", str(tmp_path), "--group", "lonely"])


def test_difference_panel_shows_each_group_whole(tmp_path, monkeypatch):
    """The third panel's range holds every group's difference to the first group, band included
    (it used to be fitted to the stds alone, which cut off a group further away than its std)."""
    from competesmoe.eval import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    groups = {arm: [synthetic_metrics(loss + 0.002 * seed) for seed in range(2)]
              for arm, loss in (("smoe", 5.0), ("competesmoe", 5.3))}
    plots.plot_group_losses(groups, tmp_path / "groups_loss.png")
    low, high = figures[0].axes[2].get_ylim()
    # competesmoe's difference is 0.3 (its seeds' std about 0.0014); smoe's is 0
    assert low <= 0.0 and high >= 0.3 + 0.0014
