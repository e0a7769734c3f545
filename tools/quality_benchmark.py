"""Quality benchmark: routers trained with identical budgets over several seeds, evaluated, compared.

    python tools/quality_benchmark.py --routers smoe,competesmoe --seeds 0,1,2 --limit 200 \\
        --blimp-dir ../shared/data/blimp/BLiMP.zip --out benchmarks/results/quality_cpu

Each (router, seed) trains `--config` (default configs/quality/cpu.yaml: the embedded corpus, the
same steps, batch and model for every router) into RUNS_DIR/<router>_seed<seed> in this process,
then is evaluated with competesmoe-eval: validation loss and perplexity on the whole validation
split, zero-shot LAMBADA, HellaSwag, PIQA, ARC-Easy/Challenge and WinoGrande on their first
`--limit` examples, and BLiMP on the first `--blimp-limit` pairs of each paradigm when given.
Writes OUT.json (every run's results and the aggregates) and OUT.md (mean ± sample std over seeds
per router, and with two routers their difference ± its standard error). A finished run is not
trained again (the trainer resumes at its last step and stops), so an interrupted benchmark
continues where it stopped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from competesmoe.config import load_config
from competesmoe.eval.cli import main as eval_main
from competesmoe.train.trainer import REQUEUE_EXIT_CODE, train

ROOT = Path(__file__).resolve().parent.parent
ZERO_SHOT = "lambada,hellaswag,piqa,arc_easy,arc_challenge,winogrande"
# (task, metric, label, chance level or None); lower is better for loss and ppl.
METRICS = [
    ("val", "loss", "validation loss", None),
    ("val", "ppl", "validation perplexity", None),
    ("lambada", "acc", "LAMBADA acc", 0.0),
    ("lambada", "ppl", "LAMBADA ppl", None),
    ("hellaswag", "acc", "HellaSwag acc", 0.25),
    ("hellaswag", "acc_norm", "HellaSwag acc_norm", 0.25),
    ("piqa", "acc", "PIQA acc", 0.5),
    ("piqa", "acc_norm", "PIQA acc_norm", 0.5),
    ("arc_easy", "acc", "ARC-Easy acc", 0.25),
    ("arc_easy", "acc_norm", "ARC-Easy acc_norm", 0.25),
    ("arc_challenge", "acc", "ARC-Challenge acc", 0.25),
    ("arc_challenge", "acc_norm", "ARC-Challenge acc_norm", 0.25),
    ("winogrande", "acc", "WinoGrande acc", 0.5),
    ("blimp", "acc", "BLiMP acc", 0.5),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quality" / "cpu.yaml")
    p.add_argument("--routers", default="smoe,competesmoe", help="comma list of model.moe.router values")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--limit", type=int, default=200, help="examples per zero-shot task")
    p.add_argument("--blimp-dir", type=Path, help="BLiMP's jsonl files (directory or zip); BLiMP is skipped without it")
    p.add_argument("--blimp-limit", type=int, default=50, help="pairs per BLiMP paradigm")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/quality"))
    p.add_argument("--data-cache", default="data_cache")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice). On a CPU shared "
                                               "with other jobs 1 can be several times faster than 2")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_cpu",
                   help="output path without extension (.json and .md are written)")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_tokens_per_s(run_dir: Path) -> float:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in lines if "tokens_per_s" in r)


def evaluate(run_dir: Path, args: argparse.Namespace) -> dict:
    """competesmoe-eval's results for the run: validation on all its windows, the zero-shot tasks on
    their first --limit examples, BLiMP on --blimp-limit pairs per paradigm."""
    calls = [("val", []), (ZERO_SHOT, ["--limit", str(args.limit)])]
    if args.blimp_dir:
        calls.append(("blimp", ["--blimp-dir", str(args.blimp_dir), "--limit", str(args.blimp_limit)]))
    results = {}
    for tasks, extra in calls:
        out = run_dir / f"eval_{tasks.split(',')[0]}.json"
        argv = [str(run_dir), "--device", "cpu", "--data-cache", args.data_cache, "--tasks", tasks, *extra,
                "--out", str(out)]
        if eval_main(argv) != 0:
            raise SystemExit(f"competesmoe-eval {shlex.join(argv)} failed")
        results.update(json.loads(out.read_text())["results"])
    return results


def aggregate(runs: list[dict], routers: list[str]) -> dict:
    """Per router and metric: mean, sample std and count over seeds."""
    out: dict = {}
    for router in routers:
        out[router] = {}
        for task, metric, _, _ in METRICS:
            values = [r["results"][task][metric] for r in runs
                      if r["router"] == router and r["results"].get(task, {}).get("status") == "ok"]
            if values:
                out[router][f"{task}.{metric}"] = {
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values)}
    return out


def markdown(report: dict) -> str:
    routers, agg = report["routers"], report["aggregate"]
    pair = len(routers) == 2
    head = ["metric", "chance"] + routers + ([f"{routers[1]} − {routers[0]}"] if pair else [])
    lines = [
        "# Quality benchmark: routers at equal budget (CPU)", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']}. Date: {report['date']}. torch {report['torch']}.", "",
        f"Budget per run ({report['config']}): {report['budget']}. Seeds: {', '.join(map(str, report['seeds']))}. "
        f"Zero-shot tasks on their first {report['limit']} examples"
        + (f", BLiMP on the first {report['blimp_limit']} pairs of each of its 67 paradigms." if report["blimp"] else "."),
        f"Wall time of the whole benchmark: {report['wall_seconds'] / 60:.1f} min "
        "(training and evaluation on a CPU shared with other jobs: timings are noisy).", "",
        "Mean ± sample standard deviation over seeds"
        + ("; the last column is the difference of the means ± its standard error "
           "sqrt(s1²/n1 + s2²/n2), marked * when larger than twice it." if pair else "."), "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for task, metric, label, chance in METRICS:
        key = f"{task}.{metric}"
        if not all(key in agg[r] for r in routers):
            continue
        cells = [label, "-" if chance is None else f"{chance:.2f}"]
        cells += [f"{agg[r][key]['mean']:.4f} ± {agg[r][key]['std']:.4f}" for r in routers]
        if pair:
            a, b = agg[routers[0]][key], agg[routers[1]][key]
            diff = b["mean"] - a["mean"]
            se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
            cells.append(f"{diff:+.4f} ± {se:.4f}" + (" *" if se > 0 and abs(diff) > 2 * se else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per run:", "", "| router | seed | val loss | tokens/s (median) |", "|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['router']} | {run['seed']} | {run['results']['val']['loss']:.4f} | "
                     f"{run['tokens_per_s']:,.0f} |")
    lines += ["", "## Reading these numbers", "",
              "- At this scale (the budget above) the zero-shot accuracies "
              "sit at or near chance: they measure noise, not reasoning. Validation loss is the only "
              "metric here with resolution.",
              f"- The std is over training seeds on the same first {report['limit']} examples; the "
              f"examples' own sampling error (about sqrt(p(1-p)/{report['limit']}) ≈ "
              f"{math.sqrt(0.25 / report['limit']):.3f} for an accuracy near 0.5) comes on top when "
              "comparing with numbers elsewhere.",
              "- A difference not marked * is within noise. A marked one is weak evidence too: the mark "
              "only accounts for the spread over three seeds, not for the examples' sampling error above, "
              f"and with {len(METRICS)} metrics compared about one is expected to cross 2 standard errors "
              "by chance alone. The method doc expects routers to differ by tenths of a point at 0.15B "
              "scale, far below what this budget resolves.",
              "- Competition steps cost extra compute (all experts on competing layers); at equal steps "
              "CompeteSMoE spends more FLOPs than SMoE (see the tokens/s column)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = []
    for router in routers:
        for seed in seeds:
            run_dir = args.runs_dir / f"{router}_seed{seed}"
            print(f"quality: training {router} seed {seed} -> {run_dir}", flush=True)
            cfg = load_config(args.config, [f"run.dir={run_dir}", f"seed={seed}", f"model.moe.router={router}",
                                            f"data.cache_dir={args.data_cache}"])
            result = train(cfg)
            if result.stopped_early:
                # The trainer saved and returned on SIGTERM/SIGUSR1: a partly trained run must not be evaluated.
                print(f"quality: stopped by a signal at step {result.step}; run the same command again to continue",
                      flush=True)
                return REQUEUE_EXIT_CODE
            print(f"quality: evaluating {router} seed {seed}", flush=True)
            runs.append({"router": router, "seed": seed, "run_dir": str(run_dir),
                         "tokens_per_s": median_tokens_per_s(run_dir), "results": evaluate(run_dir, args)})
    cfg = load_config(args.config)
    tc = cfg.train
    report = {
        "command": "python " + shlex.join(sys.argv if argv is None else ["tools/quality_benchmark.py", *argv]),
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}, {cpu_name()}), "
                   f"no GPU, {torch.get_num_threads()} torch threads",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "budget": f"{tc.steps} steps x {tc.global_batch} x {tc.seq_len} tokens = "
                  f"{tc.steps * tc.global_batch * tc.seq_len / 1e6:.2f}M tokens, d_model {cfg.model.d_model}, "
                  f"{cfg.model.n_layers} layers, {cfg.model.moe.num_experts} experts top-{cfg.model.moe.top_k}",
        "routers": routers, "seeds": seeds, "limit": args.limit,
        "blimp": bool(args.blimp_dir), "blimp_limit": args.blimp_limit,
        "wall_seconds": time.perf_counter() - start,
        "aggregate": aggregate(runs, routers), "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
