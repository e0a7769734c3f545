"""Quality study: routers and CompeteSMoE variants trained alike over several seeds, evaluated, and
compared at equal steps and at equal training FLOPs.

    python tools/quality_benchmark.py --blimp-dir ../shared/data/blimp/BLiMP.zip \\
        --out benchmarks/results/quality_study_cpu

Arms (--arms, ARMS below): smoe; competesmoe (the paper's coefficients and fixed schedule);
competesmoe_detach (competition balance term detached, the cheap variant); competesmoe_adaptive
(competition.mode=adaptive, the same budget steered to the layers whose router agrees least);
competesmoe_sharp (distillation target softmax(s / T), T = --sharp-temperature); smoe_flops (SMoE
trained for as many steps as CompeteSMoE's training FLOPs buy, seed by seed: the equal-compute
baseline); optionally sigmoid, xmoe, competesmoe_adaptive_decay.

Each (arm, seed) trains --config (configs/quality/study_cpu.yaml: same data, model, batch and steps
for every arm) into RUNS_DIR/<arm>/seed<seed> in a subprocess, --jobs runs at a time with --threads
torch threads each, then is evaluated with competesmoe-eval: validation loss on the whole validation
split; zero-shot LAMBADA, HellaSwag, PIQA, ARC-Easy/Challenge and WinoGrande on their first --limit
examples; BLiMP on the first --blimp-limit pairs of each of its 67 paradigms; and the routing
analysis over the run's checkpoints (expert change rate, load, forced-competition agreement) into
RUN/routing.json. Writes OUT.json (every run, the aggregates, the comparisons), OUT.md and the
figures OUT/ (through competesmoe-plot --group).

Resumable: a finished run or evaluation is not redone, and a run stopped half way resumes from its
checkpoint, so the same command continues a killed study. Ctrl-C or SIGTERM stops the running jobs
with a checkpoint (exit 42).

--plan prints the runs, their steps and training FLOPs; --calibrate N trains smoe and competesmoe
for N steps as the study would (--jobs at once), evaluates one, and projects the study's duration
and the --steps that fits --target-minutes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
ZERO_SHOT = ("lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
# The accuracy the study reads of each zero-shot task (acc_norm where lm-eval reports it for the
# task's length-varying choices), and chance.
ZERO_SHOT_METRIC = {"lambada": ("acc", 0.0), "hellaswag": ("acc_norm", 0.25), "piqa": ("acc_norm", 0.5),
                    "arc_easy": ("acc", 0.25), "arc_challenge": ("acc_norm", 0.25), "winogrande": ("acc", 0.5)}
REQUEUE_EXIT_CODE = 42
REFERENCE_ARM = "smoe"


@dataclasses.dataclass(frozen=True)
class Arm:
    what: str
    overrides: tuple[str, ...]
    flop_matched_to: Optional[str] = None  # train as many steps as this arm's training FLOPs buy


COMPETE = "model.moe.router=competesmoe"
ARMS = {
    "smoe": Arm("SMoE, softmax top-K router", ("model.moe.router=smoe",)),
    "competesmoe": Arm("CompeteSMoE, the paper's coefficients and fixed omega / A_max schedule", (COMPETE,)),
    "competesmoe_detach": Arm("CompeteSMoE, competition balance term detached (the cheap variant)",
                              (COMPETE, "model.moe.competition.detach_balance=true")),
    "competesmoe_adaptive": Arm("CompeteSMoE, adaptive competition budget (same budget, steered to the layers "
                                "whose router agrees least)", (COMPETE, "model.moe.competition.mode=adaptive")),
    "competesmoe_adaptive_decay": Arm("CompeteSMoE, adaptive budget decaying to half as the routers catch up",
                                      (COMPETE, "model.moe.competition.mode=adaptive",
                                       "model.moe.competition.adaptive.min_budget=0.5")),
    "competesmoe_sharp": Arm("CompeteSMoE, sharper distillation target softmax(s / T)", (COMPETE,)),
    "smoe_flops": Arm("SMoE trained for the steps CompeteSMoE's training FLOPs buy (equal compute)",
                      ("model.moe.router=smoe",), flop_matched_to="competesmoe"),
    "sigmoid": Arm("sigma-MoE (sigmoid router)", ("model.moe.router=sigmoid",)),
    "xmoe": Arm("XMoE", ("model.moe.router=xmoe",)),
}
DEFAULT_ARMS = "smoe,competesmoe,competesmoe_detach,competesmoe_adaptive,competesmoe_sharp,smoe_flops"


@dataclasses.dataclass
class Run:
    arm: str
    seed: int
    run_dir: Path
    steps: int
    overrides: list[str]
    flops: float = 0.0  # planned training FLOPs (competition expected from the schedule)

    @property
    def name(self) -> str:
        return f"{self.arm} seed {self.seed}"


# -- arguments -------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quality" / "study_cpu.yaml")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--steps", type=int, help="training steps of every arm (default: the config's train.steps); "
                                             "smoe_flops gets more")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. model.d_model=96 train.global_batch=32")
    p.add_argument("--evals", type=int, default=12, help="validation points per run (default 12)")
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints kept per run for the expert change rate")
    p.add_argument("--sharp-temperature", type=float, default=0.02,
                   help="competesmoe_sharp's competition.target_temperature (default 0.02)")
    p.add_argument("--limit", type=int, default=500, help="examples per zero-shot task (default 500)")
    p.add_argument("--blimp-dir", type=Path, help="BLiMP's jsonl files (directory or zip); BLiMP is skipped without it")
    p.add_argument("--blimp-limit", type=int, default=100, help="pairs per BLiMP paradigm (default 100, x 67)")
    p.add_argument("--routing-windows", type=int, default=64, help="validation windows of the routing analysis")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/quality_study"))
    p.add_argument("--data-cache", default="data_cache")
    p.add_argument("--jobs", type=int, default=2, help="runs trained and evaluated at once (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_study_cpu",
                   help="output path without extension: OUT.json, OUT.md and the figures in OUT/")
    p.add_argument("--plan", action="store_true", help="print the runs and their budgets, then exit")
    p.add_argument("--calibrate", type=int, metavar="STEPS",
                   help="time STEPS steps of smoe and competesmoe and one evaluation, project the study, exit")
    p.add_argument("--target-minutes", type=float, default=90.0, help="the duration --calibrate sizes --steps for")
    args = p.parse_args(argv)
    args.arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arm_names if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    for arm in args.arm_names:
        matched = ARMS[arm].flop_matched_to
        if matched and matched not in args.arm_names:
            p.error(f"arm {arm} is matched to {matched}'s FLOPs: add {matched} to --arms")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    for name in ("jobs", "threads", "evals", "checkpoints", "limit", "blimp_limit", "routing_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.sharp_temperature <= 0:
        p.error("--sharp-temperature must be > 0")
    if args.blimp_dir is not None and not args.blimp_dir.exists():
        p.error(f"--blimp-dir {args.blimp_dir} does not exist")
    # The jobs run in the repository root: every path the user gave is taken from here.
    for name in ("config", "blimp_dir", "runs_dir", "out"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.data_cache = str(Path(args.data_cache).resolve())
    return args


# -- the plan --------------------------------------------------------------------------------------
def arm_overrides(arm: str, args) -> list[str]:
    extra = [f"model.moe.competition.target_temperature={args.sharp_temperature}"] if arm == "competesmoe_sharp" else []
    return list(ARMS[arm].overrides) + extra


def load(args, overrides: list[str]):
    from competesmoe.config import load_config

    return load_config(args.config, [*args.set, *overrides])


def cadence(cfg, steps: int, args) -> list[str]:
    """Validation every ~steps/evals steps (a multiple of log_every, so that its FLOPs are exact) and
    --checkpoints kept checkpoints."""
    log_every = cfg.train.log_every
    eval_every = max(log_every, round(steps / args.evals / log_every) * log_every)
    ckpt_every = max(1, steps // args.checkpoints)
    return [f"train.eval_every={eval_every}", f"train.ckpt_every={ckpt_every}", f"train.keep_every={ckpt_every}"]


def planned_flops(cfg) -> tuple[float, float]:
    """(training FLOPs of the run, of which competition), from the model's FLOP count and the
    competition table of the run's seed (the adaptive mode spends the same expected budget)."""
    from competesmoe.model.moe.schedule import CompetitionSchedule
    from competesmoe.model.transformer import Transformer

    model = Transformer(cfg.model)  # small; on the meta device torch would load its compiler (slow)
    tc, c = cfg.train, cfg.model.moe.competition
    tokens = tc.global_batch * tc.seq_len
    base = model.flops_per_token(tc.seq_len) * tokens * tc.steps
    if not cfg.model.moe.has_competition:
        return base, 0.0
    mode = "schedule" if c.mode == "adaptive" else c.mode
    table = CompetitionSchedule(cfg.seed, len(model.moe_layers), tc.steps, c.omega, c.a_max, c.warmup_fraction,
                                mode).table
    # every MoE layer has the same competition cost
    competition = float(table.sum()) * model.moe_layers[0].competition_flops(tokens)
    return base + competition, competition


def plan(args, steps: Optional[int] = None) -> list[Run]:
    base_cfg = load(args, [])
    steps = steps or args.steps or base_cfg.train.steps
    runs: list[Run] = []
    flops: dict[tuple[str, int], float] = {}
    # Arms matched to another's FLOPs come after it.
    order = sorted(args.arm_names, key=lambda a: ARMS[a].flop_matched_to is not None)
    for seed in args.seed_list:
        for arm in order:
            common = [f"seed={seed}", f"data.cache_dir={args.data_cache}", "run.progress=log"]
            overrides = arm_overrides(arm, args) + common
            arm_steps = steps
            matched = ARMS[arm].flop_matched_to
            if matched:
                per_step = planned_flops(load(args, overrides + ["train.steps=1"]))[0]
                arm_steps = max(steps, round(flops[(matched, seed)] / per_step))
            cfg = load(args, overrides + [f"train.steps={arm_steps}"])
            run_dir = args.runs_dir / arm / f"seed{seed}"
            full = overrides + [f"train.steps={arm_steps}", *cadence(cfg, steps, args), f"run.dir={run_dir}"]
            total = planned_flops(load(args, full))[0]
            flops[(arm, seed)] = total
            runs.append(Run(arm, seed, run_dir, arm_steps, full, total))
    # Seeds outermost, arms in the order given: a partial study has whole seeds of every arm.
    rank = {a: i for i, a in enumerate(args.arm_names)}
    return sorted(runs, key=lambda r: (args.seed_list.index(r.seed), rank[r.arm]))


def print_plan(runs: list[Run], args) -> None:
    cfg = load(args, [])
    tokens = cfg.train.global_batch * cfg.train.seq_len
    print(f"{len(runs)} runs, {args.jobs} at a time with {args.threads} thread(s) each; config {args.config}")
    print(f"{'arm':28s} {'seed':>4s} {'steps':>6s} {'tokens':>8s} {'TFLOP':>8s}  run dir")
    for r in runs:
        print(f"{r.arm:28s} {r.seed:4d} {r.steps:6d} {r.steps * tokens / 1e6:7.2f}M {r.flops / 1e12:8.2f}  {r.run_dir}")


# -- running jobs ----------------------------------------------------------------------------------
class Jobs:
    """Subprocesses of the study; a stop signal is passed on to them (they save and exit 42) and no
    new one starts."""

    def __init__(self, threads: int):
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        PYTHONUNBUFFERED="1")
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopped = False

    def stop(self, signum, frame) -> None:
        if self.stopped:
            return
        self.stopped = True
        print(f"\nquality: {signal.Signals(signum).name}: stopping the running jobs (they save a checkpoint); "
              "run the same command again to continue", flush=True)
        with self.lock:
            for proc in self.live:
                proc.send_signal(signal.SIGTERM)

    def run(self, cmd: list[str], log: Path) -> int:
        """Run cmd with its output appended to `log`; its exit code (42 when stopped)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if self.stopped:
                return REQUEUE_EXIT_CODE
            with open(log, "a") as out:
                out.write(f"\n$ {shlex.join(cmd)}\n")
                out.flush()
                # Own session: Ctrl-C reaches the study, which passes one SIGTERM on.
                proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            self.live.add(proc)
        code = proc.wait()
        with self.lock:
            self.live.discard(proc)
        return REQUEUE_EXIT_CODE if self.stopped and code != 0 else code


def latest_step(run_dir: Path) -> Optional[int]:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    return int(latest.read_text().strip().rsplit("_", 1)[-1])


def eval_calls(run: Run, args) -> list[tuple[Path, list[str]]]:
    """(result file, competesmoe-eval arguments) of a run's evaluations."""
    common = ["--device", "cpu", "--data-cache", args.data_cache]
    out = run.run_dir / "eval"
    calls = [(out / "val.json", [str(run.run_dir), "--tasks", "val", *common]),
             (out / "zeroshot.json", [str(run.run_dir), "--tasks", ",".join(ZERO_SHOT), "--limit", str(args.limit),
                                      *common])]
    if args.blimp_dir:
        calls.append((out / "blimp.json", [str(run.run_dir), "--tasks", "blimp", "--blimp-dir", str(args.blimp_dir),
                                           "--limit", str(args.blimp_limit), *common]))
    calls.append((run.run_dir / "routing.json", ["routing", str(run.run_dir), "--windows", str(args.routing_windows),
                                                 *common]))
    return calls


def evaluated_at(path: Path) -> Optional[int]:
    """The step a result file was computed at (a routing report: its newest checkpoint)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if "checkpoints" in report:
        return report["checkpoints"][-1]["step"] if report["checkpoints"] else None
    return report.get("step")


def finished(run: Run, args) -> bool:
    return latest_step(run.run_dir) == run.steps and all(evaluated_at(path) == run.steps
                                                         for path, _ in eval_calls(run, args))


def train_and_evaluate(run: Run, args, jobs: Jobs) -> dict:
    """Train (or resume, or find finished) and evaluate one run; {"status": ..., timings}."""
    start = time.perf_counter()
    timings = {}
    if latest_step(run.run_dir) != run.steps:
        code = jobs.run([sys.executable, "-m", "competesmoe.train", str(args.config), *args.set, *run.overrides],
                        run.run_dir / "train.log")
        if code != 0:
            return {"status": "stopped" if code == REQUEUE_EXIT_CODE else f"training failed (exit {code})"}
        timings["train_s"] = time.perf_counter() - start
    for path, call in eval_calls(run, args):
        if evaluated_at(path) == run.steps:
            continue
        began = time.perf_counter()
        code = jobs.run([sys.executable, "-m", "competesmoe.eval.cli", *call, "--out", str(path)],
                        run.run_dir / "eval.log")
        if code != 0:
            return {"status": "stopped" if code == REQUEUE_EXIT_CODE
                    else f"evaluation {path.name} failed (exit {code})"}
        timings[f"eval_{path.stem}_s"] = time.perf_counter() - began
    return {"status": "ok", **timings}


def execute(runs: list[Run], args, jobs: Jobs) -> dict[str, dict]:
    """Every run, --jobs at a time; progress and an estimate of the time left on the way."""
    outcomes: dict[str, dict] = {}
    start, done = time.perf_counter(), 0
    # The estimate of the time left: this invocation's seconds per FLOP of the runs it worked on.
    to_do = {str(r.run_dir) for r in runs if not finished(r, args)}
    flops_left, flops_done = sum(r.flops for r in runs if str(r.run_dir) in to_do), 0.0

    def one(run: Run) -> tuple[Run, dict]:
        if jobs.stopped:
            return run, {"status": "stopped"}
        print(f"quality: {run.name}: {run.steps} steps -> {run.run_dir}", flush=True)
        return run, train_and_evaluate(run, args, jobs)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for run, outcome in pool.map(one, runs):
            outcomes[str(run.run_dir)] = outcome
            done += 1
            if str(run.run_dir) in to_do:
                flops_done += run.flops
            elapsed = time.perf_counter() - start
            left = elapsed * (flops_left - flops_done) / flops_done if flops_done else 0.0
            worked = [k for k in outcome if k.endswith("_s")]
            took = ", ".join(f"{k[:-2]} {outcome[k] / 60:.1f} min" for k in worked)
            if outcome["status"] == "ok" and not took:
                took = "done before"
            print(f"quality: [{done}/{len(runs)}] {run.name}: {outcome['status']}"
                  + (f" ({took})" if took else "") + "; "
                  f"{elapsed / 60:.1f} min so far, about {left / 60:.0f} min left", flush=True)
            if outcome["status"] not in ("ok", "stopped") and not jobs.stopped:
                print(f"quality: see {run.run_dir}/train.log and eval.log; stopping", flush=True)
                jobs.stop(signal.SIGTERM, None)
    return outcomes


# -- reading the results ---------------------------------------------------------------------------
def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def summarize_run(run: Run, ecr_interval: tuple[int, int]) -> dict:
    """One run's numbers: evaluation results, training FLOPs and the routing statistics. The expert
    change rate is read between the checkpoints of `ecr_interval`, which every arm has (smoe_flops
    saves on the same cadence and goes on longer)."""
    from competesmoe.eval import curves

    records = curves.read_metrics(run.run_dir)
    lines = curves.training_lines(records)
    flops = curves.cumulative_flops(records)
    late = [r for r in lines if r["step"] > 0.75 * run.steps]  # the last quarter of training
    n_experts = len(lines[-1]["routing"]["load"][0]) if lines and lines[-1].get("routing") else None

    def late_layer_mean(key):
        return _mean(_mean(v for v in (r.get("routing") or {}).get(key) or []) for r in late)

    entropy = late_layer_mean("s_entropy")
    out = {
        "arm": run.arm, "seed": run.seed, "run_dir": str(run.run_dir), "steps": run.steps,
        "flops": {"total": float(flops[1][-1]), "competition": float(flops[2][-1]),
                  "competition_share": float(flops[2][-1] / flops[1][-1])} if flops else None,
        "competing_layers": _mean(r.get("competing_layers") for r in lines),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in lines) if lines else None,
        "train_loss_late": _mean(r["loss"] for r in late),
        "agreement_late": late_layer_mean("agreement"),
        "target_entropy_gap_late": None if entropy is None or n_experts is None else math.log(n_experts) - entropy,
        "load_entropy_late": _mean(curves.normalized_entropy(layer) for r in late
                                   for layer in (r.get("routing") or {}).get("load") or []),
        "val_curve": [list(map(float, a)) for a in curves.val_curve(records)],
        "results": {},
    }
    if flops:
        steps, losses = curves.val_curve(records)
        out["val_curve_flops"] = [float(f) for f in curves.flops_at(records, steps)]
    for name in ("val", "zeroshot", "blimp"):
        path = run.run_dir / "eval" / f"{name}.json"
        if path.is_file():
            out["results"].update(json.loads(path.read_text())["results"])
    routing = run.run_dir / "routing.json"
    if routing.is_file():
        report = json.loads(routing.read_text())
        last = report["checkpoints"][-1]
        rates = [r for r in report["change_rate"] if (r["from"], r["to"]) == tuple(ecr_interval)]
        out["routing"] = {
            "load_entropy": _mean(curves.normalized_entropy(layer) for layer in last["load"]),
            "ecr_topk": _mean(rates[-1]["topk"]) if rates else None,
            "ecr_top1": _mean(rates[-1]["top1"]) if rates else None,
            "ecr_interval": list(ecr_interval),
            "forced_agreement": _mean(last["competition"]["agreement"]) if last.get("competition") else None,
        }
    return out


def metric_values(summary: dict) -> dict[str, Optional[float]]:
    """The flat metrics the tables compare (None where a run does not have one)."""
    res = summary["results"]

    def ok(task, metric):
        r = res.get(task, {})
        return r.get(metric) if r.get("status") == "ok" else None

    zero = {t: ok(t, m) for t, (m, _) in ZERO_SHOT_METRIC.items()}
    routing = summary.get("routing") or {}
    flops = summary.get("flops") or {}
    return {
        "val_loss": ok("val", "loss"), "val_ppl": ok("val", "ppl"),
        "blimp_acc": ok("blimp", "acc"),
        **{f"{t}_{ZERO_SHOT_METRIC[t][0]}": v for t, v in zero.items()},
        "zeroshot_mean": _mean(zero.values()) if all(v is not None for v in zero.values()) else None,
        "train_tflop": flops.get("total", 0) / 1e12 if flops else None,
        "competition_share": flops.get("competition_share"),
        "competing_layers": summary["competing_layers"],
        "agreement_late": summary["agreement_late"],
        "forced_agreement": routing.get("forced_agreement"),
        "target_entropy_gap_late": summary["target_entropy_gap_late"],
        "load_entropy_late": summary["load_entropy_late"],
        "load_entropy_val": routing.get("load_entropy"),
        "ecr_topk": routing.get("ecr_topk"), "ecr_top1": routing.get("ecr_top1"),
    }


# (key, label, digits); zero-shot rows are added from ZERO_SHOT_METRIC.
QUALITY_ROWS = [("val_loss", "validation loss (whole split)", 4), ("val_ppl", "validation perplexity", 2),
                ("blimp_acc", "BLiMP acc (67 paradigms, equally many pairs each)", 4)]
QUALITY_ROWS += [(f"{t}_{m}", f"{t} {m} (chance {c:.2f})", 4) for t, (m, c) in ZERO_SHOT_METRIC.items()]
QUALITY_ROWS += [("zeroshot_mean", "mean of the six zero-shot accuracies", 4)]
ROUTING_ROWS = [("train_tflop", "training TFLOP (competition included)", 3),
                ("competition_share", "share of training FLOPs spent on competition", 4),
                ("competing_layers", "competing layers per step", 3),
                ("agreement_late", "router/competition agreement, last quarter of training", 4),
                ("forced_agreement", "agreement of a forced competition at the end (validation tokens)", 4),
                ("target_entropy_gap_late", "ln E - H(p^C) of the distillation target, last quarter", 6),
                ("load_entropy_late", "expert load entropy / ln E, last quarter of training", 4),
                ("load_entropy_val", "expert load entropy / ln E at the end (validation tokens)", 4),
                ("ecr_topk", "expert change rate (top-K) over the last checkpoint interval of the base steps", 4),
                ("ecr_top1", "expert change rate (top-1) over the same interval", 4)]


def aggregate(summaries: list[dict], arms: list[str]) -> dict:
    out: dict = {}
    for arm in arms:
        rows = [metric_values(s) for s in summaries if s["arm"] == arm]
        out[arm] = {}
        for key in (rows[0] if rows else {}):
            values = [r[key] for r in rows if r[key] is not None]
            if values:
                out[arm][key] = {"mean": statistics.fmean(values), "n": len(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


# Two-sided 95% critical values of Student's t by degrees of freedom; a df between two entries
# takes the smaller df's (larger, conservative) value.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t95(df: float) -> float:
    usable = [d for d in _T95 if d <= df]
    return _T95[max(usable)] if usable else math.inf


def _significant(diff: float, se: float, df: float) -> bool:
    """|diff| > t_0.975(df) x se; a standard error of (numerically) zero, e.g. accuracies that moved by
    the same count on every seed, is a degenerate test and resolves nothing."""
    return bool(se > 1e-12 * max(abs(diff), 1.0) and abs(diff) > t95(df) * se)


def difference(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> Optional[dict]:
    """b - a over seeds, two ways, each `resolved` when |diff| > t_0.975(df) x its standard error:
    Welch (difference of the means, SE sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite df), and
    paired by seed (mean of the per-seed differences, SE their std / sqrt(n), df n - 1; the same seed
    means the same initial weights and data order, so the pairs share part of their noise)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = [v for _, v in a], [v for _, v in b]
    qa, qb = statistics.variance(va) / len(va), statistics.variance(vb) / len(vb)
    diff, se = statistics.fmean(vb) - statistics.fmean(va), math.sqrt(qa + qb)
    df = (qa + qb) ** 2 / (qa ** 2 / (len(va) - 1) + qb ** 2 / (len(vb) - 1)) if se > 0 else math.inf
    out = {"diff": diff, "se": se, "df": df, "resolved": _significant(diff, se, df)}
    paired = [dict(b)[s] - v for s, v in a if s in dict(b)]
    if len(paired) > 1:
        out.update(paired_diff=statistics.fmean(paired), paired_n=len(paired),
                   paired_se=statistics.stdev(paired) / math.sqrt(len(paired)))
        out["paired_resolved"] = _significant(out["paired_diff"], out["paired_se"], len(paired) - 1)
    return out


def per_seed(summaries: list[dict], arm: str, key: str) -> list[tuple[int, float]]:
    return [(s["seed"], metric_values(s)[key]) for s in summaries
            if s["arm"] == arm and metric_values(s)[key] is not None]


def equal_flops(summaries: list[dict], arms: list[str]) -> dict:
    """Each competing arm's final validation loss against SMoE at the same training FLOPs, seed by seed:
      end_of_training  SMoE's final loss at that compute, linear in log FLOPs between the final losses
                       of smoe (equal steps) and smoe_flops (equal to competesmoe's FLOPs), both
                       trained to the end of their own learning-rate schedule (fair, needs smoe_flops);
      along_curve      the arm's validation curve read at SMoE's final FLOPs (interpolated between its
                       validation points), against SMoE's final loss. Mid-run points of a cosine
                       schedule are not annealed, so this favours SMoE; shown for the curves' sake."""
    from competesmoe.eval import curves

    by = {(s["arm"], s["seed"]): s for s in summaries}
    out = {}
    for arm in arms:
        if arm in (REFERENCE_ARM, "smoe_flops") or not arm.startswith("competesmoe"):
            continue
        end, along = [], []
        for seed in sorted({s["seed"] for s in summaries}):
            x, base, long = by.get((arm, seed)), by.get((REFERENCE_ARM, seed)), by.get(("smoe_flops", seed))
            if not x or not base or not x.get("flops") or not base.get("flops"):
                continue
            loss_x, loss_base = metric_values(x)["val_loss"], metric_values(base)["val_loss"]
            if loss_x is None or loss_base is None:
                continue
            fx, f0 = x["flops"]["total"], base["flops"]["total"]
            if long and long.get("flops") and metric_values(long)["val_loss"] is not None:
                f1, loss_long = long["flops"]["total"], metric_values(long)["val_loss"]
                if f1 > f0:
                    w = (math.log(fx) - math.log(f0)) / (math.log(f1) - math.log(f0))
                    end.append({"seed": seed, "flops": fx, "smoe_at_flops": loss_base + w * (loss_long - loss_base),
                                "loss": loss_x, "extrapolated": not 0 <= w <= 1})
            steps_flops, curve = x.get("val_curve_flops"), x["val_curve"][1]
            if steps_flops:
                at = curves.interpolate(curves.np.array(steps_flops), curves.np.array(curve), f0)
                if at is not None:
                    along.append({"seed": seed, "flops": f0, "loss_along_curve": at, "smoe_final": loss_base})
        out[arm] = {"end_of_training": end, "along_curve": along}
        for name, rows, a_key, b_key in (("end_of_training", end, "smoe_at_flops", "loss"),
                                         ("along_curve", along, "smoe_final", "loss_along_curve")):
            diffs = [r[b_key] - r[a_key] for r in rows]
            if len(diffs) > 1:
                mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
                out[arm][f"{name}_diff"] = {"mean": mean, "se": se, "n": len(diffs),
                                            "resolved": _significant(mean, se, len(diffs) - 1)}
    return out


# -- the report ------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell(stat: Optional[dict], digits: int) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _diff_cell(d: Optional[dict], digits: int = 4) -> str:
    if not d:
        return "-"
    text = f"{d['diff']:+.{digits}f} ± {d['se']:.{digits}f}" + (" *" if d["resolved"] else "")
    if "paired_diff" in d:
        text += (f" (paired {d['paired_diff']:+.{digits}f} ± {d['paired_se']:.{digits}f}"
                 + (" *" if d["paired_resolved"] else "") + ")")
    return text


def findings(report: dict) -> list[str]:
    """Plain sentences on what the numbers resolve, generated from them."""
    agg, arms, comp = report["aggregate"], report["arms"], report["comparisons"]
    lines = []
    spreads = [agg[a]["val_loss"]["std"] for a in arms if "val_loss" in agg[a]]
    if spreads:
        lines.append(f"Seed-to-seed spread (sample std over {len(report['seeds'])} seeds) of the final validation "
                     f"loss: {min(spreads):.4f} to {max(spreads):.4f} across arms.")
    for arm in arms:
        d = comp.get(arm, {}).get("val_loss")
        if not d:
            continue
        paired = d.get("paired_resolved")
        verdict = ("resolved at this budget (95% t-test)" if d["resolved"] or paired
                   else "not resolved at this budget: within the 95% t interval of zero")
        text = f"{arm} vs {REFERENCE_ARM} at equal steps: validation loss {d['diff']:+.4f} ± {d['se']:.4f}"
        if "paired_diff" in d:
            text += f" (paired by seed {d['paired_diff']:+.4f} ± {d['paired_se']:.4f})"
        lines.append(f"{text}, {verdict}.")
    for arm, rows in report["equal_flops"].items():
        d = rows.get("end_of_training_diff")
        if d:
            verdict = "resolved (95% t-test)" if d["resolved"] else "not resolved (within the 95% t interval of zero)"
            sign = "lower (better)" if d["mean"] < 0 else "higher (worse)"
            lines.append(f"{arm} vs SMoE at equal training FLOPs (end of training): {d['mean']:+.4f} ± {d['se']:.4f} "
                         f"over {d['n']} seeds, {sign} than SMoE, {verdict}.")
    for task, (metric, chance) in ZERO_SHOT_METRIC.items():
        key = f"{task}_{metric}"
        means = [agg[a][key]["mean"] for a in arms if key in agg[a]]
        if means and chance > 0:
            se = math.sqrt(chance * (1 - chance) / report["limit"])
            if all(abs(m - chance) < 2 * se for m in means):
                lines.append(f"{task}: every arm is within two binomial standard errors ({se:.3f}) of chance "
                             f"({chance:.2f}): this task cannot rank the arms at this scale.")
    gap = agg.get("competesmoe", {}).get("target_entropy_gap_late")
    if gap:
        lines.append(f"Distillation target of the paper's method at this scale: ln E - H(softmax(s)) = "
                     f"{gap['mean']:.6f} in the last quarter of training (a uniform target has 0; ln E = "
                     f"{math.log(16):.3f} for 16 experts)." if report.get("num_experts") == 16 else
                     f"Distillation target of the paper's method: ln E - H(softmax(s)) = {gap['mean']:.6f}.")
    return lines


def markdown(report: dict) -> str:
    arms, agg = report["arms"], report["aggregate"]
    head = "| metric | " + " | ".join(arms) + " |\n|---|" + "---|" * len(arms)
    lines = [
        "# Quality study: does competition pay for itself? (CPU)", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']}. Date: {report['date']}. torch {report['torch']}. "
        f"Wall time of this invocation: {report['wall_seconds'] / 60:.1f} min.", "",
        f"Budget per run: {report['budget']}. Seeds: {', '.join(map(str, report['seeds']))}. "
        f"Zero-shot tasks on their first {report['limit']} examples"
        + (f"; BLiMP on the first {report['blimp_limit']} pairs of each of its 67 paradigms." if report["blimp"]
           else "; BLiMP not run (no --blimp-dir)."), "",
        "## Arms", "", "| arm | what | overrides |", "|---|---|---|",
    ]
    for arm in arms:
        lines.append(f"| {arm} | {report['arm_descriptions'][arm]} | `{' '.join(report['arm_overrides'][arm])}` |")
    lines += ["", "## Quality at equal steps", "",
              "Mean ± sample standard deviation over seeds (smoe_flops trains longer: it is the equal-compute "
              "baseline, see below).", "", head]
    for key, label, digits in QUALITY_ROWS:
        if any(key in agg[a] for a in arms):
            lines.append(f"| {label} | " + " | ".join(_cell(agg[a].get(key), digits) for a in arms) + " |")
    lines += ["", f"### Differences to {REFERENCE_ARM}", "",
              "Difference of the means ± its standard error sqrt(s1²/n1 + s2²/n2); in brackets the mean ± "
              "standard error of the per-seed differences (same seed: same initial weights and data order). * "
              "marks a difference larger than the two-sided 95% Student-t critical value times its standard "
              "error (Welch-Satterthwaite degrees of freedom; paired: seeds - 1, so 4.30 x SE with 3 seeds).", "",
              "| arm | validation loss | BLiMP acc | mean zero-shot acc |", "|---|---|---|---|"]
    for arm in arms:
        if arm == REFERENCE_ARM:
            continue
        c = report["comparisons"].get(arm, {})
        lines.append(f"| {arm} | {_diff_cell(c.get('val_loss'))} | {_diff_cell(c.get('blimp_acc'))} | "
                     f"{_diff_cell(c.get('zeroshot_mean'))} |")
    lines += ["", "## Quality at equal training FLOPs", "",
              "Training FLOPs count every matmul of the step (forward + backward) and the all-expert passes of "
              "competition. *End of training*: the arm's final validation loss minus SMoE's at the same FLOPs, "
              "SMoE's read (linear in log FLOPs) between its final losses at equal steps (smoe) and at "
              "CompeteSMoE's FLOPs (smoe_flops), both trained to the end of their own learning-rate schedule. "
              "*Along the curve*: the arm's validation curve read at SMoE's final FLOPs minus SMoE's final loss "
              "(mid-run points of a cosine schedule are not annealed, so this favours SMoE). Mean ± standard error "
              "over seeds, * as above (paired); negative = better than SMoE.", "",
              "| arm | FLOPs / SMoE's | end of training | along the curve |", "|---|---|---|---|"]
    base_flops = agg.get(REFERENCE_ARM, {}).get("train_tflop", {}).get("mean")
    for arm, rows in report["equal_flops"].items():
        ratio = agg[arm].get("train_tflop", {}).get("mean")
        ratio_text = f"{ratio / base_flops:.3f}" if ratio and base_flops else "-"
        cells = []
        for name in ("end_of_training_diff", "along_curve_diff"):
            d = rows.get(name)
            cells.append(f"{d['mean']:+.4f} ± {d['se']:.4f}" + (" *" if d["resolved"] else "") if d else "-")
        lines.append(f"| {arm} | {ratio_text} | " + " | ".join(cells) + " |")
    lines += ["", "## Routing statistics", "", head]
    for key, label, digits in ROUTING_ROWS:
        if any(key in agg[a] for a in arms):
            lines.append(f"| {label} | " + " | ".join(_cell(agg[a].get(key), digits) for a in arms) + " |")
    interval = next((s["routing"]["ecr_interval"] for s in report["runs"] if s.get("routing")), None)
    lines += ["", f"Agreement at chance is K/E = {report.get('chance', 0):.3f}. Training statistics are means over "
              "the logged windows of the last quarter of training (agreement and the target's entropy over the "
              "windows in which a layer competed); validation-token statistics come from competesmoe-eval routing"
              + (f"; the expert change rate is between the checkpoints of steps {interval[0]} and {interval[1]}."
                 if interval else "."), "",
              "## Per run", "", "| arm | seed | steps | val loss | BLiMP | zero-shot mean | TFLOP | tokens/s |",
              "|---|---|---|---|---|---|---|---|"]
    for s in report["runs"]:
        m = metric_values(s)

        def f(v, d=4):
            return "-" if v is None else f"{v:.{d}f}"

        lines.append(f"| {s['arm']} | {s['seed']} | {s['steps']} | {f(m['val_loss'])} | {f(m['blimp_acc'])} | "
                     f"{f(m['zeroshot_mean'])} | {f(m['train_tflop'], 3)} | "
                     f"{'-' if s['tokens_per_s'] is None else format(round(s['tokens_per_s']), ',')} |")
    if report.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{Path(p).stem}]({p})" for p in report["figures"]]
    lines += ["", "## What the data shows, and what it does not", ""]
    lines += [f"- {s}" for s in findings(report)]
    lines += [
        "- Differences not marked * are within noise. A marked one is weak evidence as well: with this many "
        "metrics and arms compared, about one in twenty crosses the 95% threshold by chance alone, and the "
        "zero-shot standard deviations are over training seeds on the same examples (their sampling error, "
        f"about sqrt(p(1-p)/{report['limit']}), comes on top).",
        f"- One small model ({report['model']}) on one small corpus, {report['tokens_per_run']} tokens per run: "
        "the method doc expects routers to differ by tenths of a perplexity point at 0.15B scale, so a null "
        "result here says the effect is below this budget's resolution, not that it is absent at scale.",
        "- tokens/s were measured with --jobs runs sharing the machine's cores; they are not a speed benchmark "
        "(`competesmoe-profile --steps` is).",
    ]
    return "\n".join(lines) + "\n"


def build_report(runs: list[Run], args, argv, wall: float, figures: list[str]) -> dict:
    cfg = load(args, [])
    tc = cfg.train
    complete = [r for r in runs if latest_step(r.run_dir) == r.steps and (r.run_dir / "eval" / "val.json").is_file()]
    steps = args.steps or tc.steps
    ckpt_every = max(1, steps // args.checkpoints)  # as cadence() sets it
    last = steps // ckpt_every * ckpt_every
    summaries = [summarize_run(r, (last - ckpt_every, last)) for r in complete]
    arms = [a for a in args.arm_names if any(s["arm"] == a for s in summaries)]
    comparisons = {}
    for arm in arms:
        if arm == REFERENCE_ARM:
            continue
        comparisons[arm] = {key: difference(per_seed(summaries, REFERENCE_ARM, key), per_seed(summaries, arm, key))
                            for key in ("val_loss", "blimp_acc", "zeroshot_mean")}
    return {
        "command": "python " + shlex.join(["tools/quality_benchmark.py", *argv]),
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}, {cpu_name()}), no GPU; "
                   f"{args.jobs} job(s) at a time, {args.threads} torch thread(s) each",
        "date": datetime.date.today().isoformat(), "torch": _torch_version(),
        "config": str(args.config), "overrides": args.set,
        "budget": f"{steps} steps x {tc.global_batch} x {tc.seq_len} tokens = "
                  f"{steps * tc.global_batch * tc.seq_len / 1e6:.2f}M tokens (smoe_flops more); d_model "
                  f"{cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.moe.num_experts} experts top-"
                  f"{cfg.model.moe.top_k} (width {cfg.model.moe.expert_hidden}); "
                  f"omega {cfg.model.moe.competition.omega}, "
                  f"A_max {cfg.model.moe.competition.a_max}; config {args.config.name}"
                  + (f" with {' '.join(args.set)}" if args.set else ""),
        "model": f"d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.moe.num_experts} experts "
                 f"top-{cfg.model.moe.top_k}",
        "tokens_per_run": f"{steps * tc.global_batch * tc.seq_len / 1e6:.2f}M",
        "num_experts": cfg.model.moe.num_experts, "chance": cfg.model.moe.top_k / cfg.model.moe.num_experts,
        "arms": arms, "arm_descriptions": {a: ARMS[a].what for a in arms},
        "arm_overrides": {a: arm_overrides(a, args) for a in arms},
        "seeds": args.seed_list, "limit": args.limit, "blimp": bool(args.blimp_dir), "blimp_limit": args.blimp_limit,
        "wall_seconds": wall, "incomplete": [str(r.run_dir) for r in runs if r not in complete],
        "aggregate": aggregate(summaries, arms), "comparisons": comparisons,
        "equal_flops": equal_flops(summaries, arms), "figures": figures, "runs": summaries,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def draw_figures(runs: list[Run], args) -> list[str]:
    """competesmoe-plot --group, one group per arm, into OUT/ (paths relative to OUT.md)."""
    from competesmoe.eval.plots import main as plot_main

    groups = []
    for arm in args.arm_names:
        dirs = [str(r.run_dir) for r in runs if r.arm == arm and (r.run_dir / "metrics.jsonl").is_file()]
        if dirs:
            groups += ["--group", arm, *dirs]
    if not groups:
        return []
    out_dir = args.out.parent / args.out.name
    if plot_main(["--out", str(out_dir), *groups]) != 0:
        raise SystemExit("competesmoe-plot failed")
    return [f"{args.out.name}/{name}" for name in ("groups_loss.png", "groups_routing.png")]


# -- calibration -----------------------------------------------------------------------------------
def calibrate(args, jobs: Jobs) -> int:
    """Time smoe and competesmoe as the study runs them, evaluate one, project the study."""
    from competesmoe.eval import curves

    steps = args.calibrate
    cal = argparse.Namespace(**vars(args))
    cal.arm_names, cal.seed_list = ["smoe", "competesmoe"], [0]
    cal.runs_dir = args.runs_dir / "_calibrate" / f"steps{steps}"
    runs = plan(cal, steps)
    for run in runs:  # checkpoint only at the end; the runs stay separate from the study's
        run.overrides = [o for o in run.overrides if not o.startswith(("train.ckpt_every", "train.keep_every"))]
        run.overrides += [f"train.ckpt_every={steps}", "train.keep_every=0"]
    walls = {}

    def one(run):
        start = time.perf_counter()
        outcome = train_and_evaluate(run, cal, jobs)
        walls[run.arm] = time.perf_counter() - start
        return run, outcome

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(one, runs))
    for run, outcome in outcomes:
        if outcome["status"] != "ok":
            print(f"quality: calibration {run.name}: {outcome['status']} (see {run.run_dir})")
            return 1
        if "train_s" not in outcome:
            print(f"quality: calibration {run.name} was already done; remove {cal.runs_dir} to time it again")
            return 1
    per = {}
    for run, outcome in outcomes:
        records = curves.read_metrics(run.run_dir)
        lines = curves.training_lines(records)
        # the first window holds the first step's warm-up
        tps = statistics.median(r["tokens_per_s"] for r in lines[1:] or lines)
        cfg = load(cal, run.overrides)
        tokens = cfg.train.global_batch * cfg.train.seq_len
        # A validation forward costs about a third of a training step per token.
        val_s = cfg.train.eval_batches * min(cfg.train.micro_batch or cfg.train.global_batch,
                                             cfg.train.global_batch) * cfg.train.seq_len / (3 * tps)
        validations = sum(1 for r in records if "val_loss" in r)
        rest = max(outcome["train_s"] - steps * tokens / tps, 0.0)
        per[run.arm] = {"step_s": tokens / tps, "val_s": val_s, "start_s": max(rest - validations * val_s, 0.0),
                        "eval_s": sum(v for k, v in outcome.items() if k.startswith("eval_")),
                        "flops_per_step": run.flops / run.steps}
    smoe, comp = per["smoe"], per["competesmoe"]
    eval_s = statistics.fmean([smoe["eval_s"], comp["eval_s"]])
    start_s = statistics.fmean([smoe["start_s"], comp["start_s"]])
    # seconds per extra FLOP of competition (not below 0: a contended machine can time it so)
    per_flop = max(comp["step_s"] - smoe["step_s"], 0.0) / max(comp["flops_per_step"] - smoe["flops_per_step"], 1.0)
    print(f"calibration ({steps} steps, {args.jobs} job(s) at once, {args.threads} thread(s) each):")
    for arm, p in per.items():
        print(f"  {arm:12s} {p['step_s'] * 1e3:7.1f} ms/step, {p['val_s']:5.1f} s per validation, "
              f"{p['start_s']:5.1f} s "
              f"start-up and checkpoints, {p['eval_s']:6.1f} s evaluation")

    def projected(study_steps: int) -> float:
        total = 0.0
        for run in plan(args, study_steps):
            flops_per_step = run.flops / run.steps
            step_s = smoe["step_s"] + (flops_per_step - smoe["flops_per_step"]) * per_flop
            every = int(next(o for o in run.overrides if o.startswith("train.eval_every=")).split("=")[1])
            validations = run.steps // every + 1 + (run.steps % every > 0)
            total += run.steps * step_s + validations * smoe["val_s"] + start_s + eval_s
        return total / args.jobs

    study_steps = args.steps or load(args, []).train.steps
    now, doubled = projected(study_steps), projected(2 * study_steps)
    per_step = (doubled - now) / study_steps  # the projection is linear in the steps
    fit = int(study_steps + (args.target_minutes * 60 - now) / per_step)
    print(f"projected study ({len(plan(args, study_steps))} runs, {study_steps} steps per arm): {now / 60:.0f} min")
    print(f"--steps {fit} would take about {args.target_minutes:.0f} min (steps timed as above, validations at the "
          "study's cadence, the evaluation of a run as measured; a projection, not a measurement)")
    return 0


def prepare_once(args) -> None:
    """Tokenize the corpus here, once, rather than in the first --jobs runs at the same time."""
    from competesmoe.data.prepare import prepare_data

    prepare_data(load(args, [f"data.cache_dir={args.data_cache}"]).data, log=print)


# -- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    jobs = Jobs(args.threads)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, jobs.stop)
    if args.calibrate:
        prepare_once(args)
        return calibrate(args, jobs)
    runs = plan(args)
    print_plan(runs, args)
    if args.plan:
        return 0
    start = time.perf_counter()
    prepare_once(args)
    outcomes = execute(runs, args, jobs)
    figures = draw_figures(runs, args)
    report = build_report(runs, args, argv, time.perf_counter() - start, figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"quality: wrote {args.out.with_suffix('.md')}, {args.out.with_suffix('.json')} and {len(figures)} figure(s)")
    if jobs.stopped or any(o["status"] == "stopped" for o in outcomes.values()):
        print("quality: stopped before the end; the report covers the finished runs. Run the same command again "
              "to continue.")
        return REQUEUE_EXIT_CODE
    failed = [d for d, o in outcomes.items() if o["status"] != "ok"]
    if failed:
        print(f"quality: {len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
