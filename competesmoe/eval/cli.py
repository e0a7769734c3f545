"""`competesmoe-eval`: perplexity and zero-shot accuracy of a checkpoint, and routing analysis.

    competesmoe-eval RUN_DIR_OR_CHECKPOINT [--tasks val,lambada,...] [--text FILE ...]
                     [--blimp-dir DIR] [--cbt-dir DIR] [--limit N] [--batch-size N]
                     [--device auto|cpu|cuda] [--data-cache DIR] [--out results.json]
    competesmoe-eval routing RUN_DIR_OR_CHECKPOINT [...] [--windows N] [--batch-size N]
                     [--device auto|cpu|cuda] [--data-cache DIR] [--out routing.json]

Under torchrun (WORLD_SIZE > 1) every rank scores a share of the requests and rank 0 reports.
A task whose data is not available is reported as missing, with how to get it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from competesmoe.errors import CompeteSMoEError, cli_main
from competesmoe.eval.distributed import init_from_env
from competesmoe.eval.perplexity import read_text_file, text_perplexity, validation_perplexity, validation_requests
from competesmoe.eval.scoring import Scorer
from competesmoe.eval.tasks import TASKS, Sources, olmo_tasks_root, run_task

ALL_TASKS = ("val",) + tuple(TASKS)
_COLUMNS = ("acc", "acc_norm", "loss", "ppl", "bits_per_byte")


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="competesmoe-eval",
        description="Evaluate a checkpoint: validation and text-file perplexity, zero-shot LAMBADA, "
                    "HellaSwag, PIQA, ARC-Easy/Challenge, WinoGrande, BLiMP and CBT. "
                    "`competesmoe-eval routing --help` for the routing analysis.")
    p.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--tasks", default=",".join(ALL_TASKS),
                   help=f"comma-separated subset of {','.join(ALL_TASKS)} (default: all)")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text files to report perplexity on")
    p.add_argument("--blimp-dir", type=Path, help="BLiMP's <paradigm>.jsonl files: a directory or a .zip")
    p.add_argument("--cbt-dir", type=Path, help="folder with the CBT release's cbtest_{CN,NE}_test_2500ex.txt")
    p.add_argument("--limit", type=_positive, help="examples per task (BLiMP: per paradigm; val: windows)")
    _common(p, batch_help="sequences per forward (default 32)", default_batch=32)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p


def _routing_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="competesmoe-eval routing",
        description="Routing analysis over checkpoints on fixed validation tokens: expert load, expert "
                    "change rate between consecutive checkpoints, router/competition agreement.")
    p.add_argument("paths", nargs="+", type=Path,
                   help="run directories (all their checkpoints) or checkpoint directories, oldest first")
    p.add_argument("--windows", type=_positive, default=64, help="validation windows of seq_len tokens (default 64)")
    _common(p, batch_help="windows per forward (default 16)", default_batch=16)
    p.add_argument("--out", type=Path, help="write the report as JSON here (input of competesmoe-plot --routing)")
    return p


def _common(p: argparse.ArgumentParser, batch_help: str, default_batch: int) -> None:
    p.add_argument("--batch-size", type=_positive, default=default_batch, help=batch_help)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU of this rank when there is one, else the CPU")
    p.add_argument("--data-cache", help="where the run's prepared data is (default: the run config's "
                                        "data.cache_dir); prepared again from its sources if absent")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        try:
            if argv[:1] == ["routing"]:
                return _routing(_routing_parser().parse_args(argv[1:]))
            return _evaluate(_eval_parser().parse_args(argv))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return cli_main(run)


# -- evaluation -----------------------------------------------------------------------------------
def _selected_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise CompeteSMoEError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(ALL_TASKS)}")
    return names


def _load(path: Path, device_name: str, data_cache: Optional[str]):
    from competesmoe.parallel.mesh import pick_device
    from competesmoe.train.checkpoint import CheckpointReader, load_for_inference, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    device = pick_device(device_name)
    cfg, model, tokenizer = load_for_inference(checkpoint, device)
    if data_cache is not None:
        cfg.data.cache_dir = data_cache
    return checkpoint, CheckpointReader(checkpoint).trainer["step"], cfg, model, tokenizer, device


def _evaluate(args: argparse.Namespace) -> int:
    tasks = _selected_tasks(args.tasks)
    texts = {f"text:{path}": read_text_file(Path(path)) for path in args.text}
    checkpoint, step, cfg, model, tokenizer, device = _load(Path(args.path), args.device, args.data_cache)
    group = init_from_env(device)
    log = print if group.is_main else (lambda *a, **k: None)
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.train.precision != "fp32" else None
    scorer = Scorer(model, tokenizer, cfg.train.seq_len, args.batch_size, group, autocast)
    sources = Sources(olmo_root=olmo_tasks_root(), blimp=args.blimp_dir, cbt=args.cbt_dir, limit=args.limit)
    log(f"eval: {checkpoint} (step {step}, router {cfg.model.moe.router}) on {device}, "
        f"{group.world} rank(s); tasks {', '.join(tasks)}")

    results: dict[str, dict] = {}
    for name in tasks:
        if name == "val":
            results[name] = _timed(partial(_validation, scorer, cfg, tokenizer.sha256, args.limit, log))
        else:
            results[name] = _timed(partial(run_task, TASKS[name], scorer, sources))
        log(f"eval: {name}: {_row_summary(results[name])}")
    for name, text in texts.items():
        results[name] = _timed(lambda text=text, name=name: {"status": "ok", **text_perplexity(scorer, text, name)})

    if group.is_main:
        report = {"checkpoint": str(checkpoint), "step": step, "router": cfg.model.moe.router,
                  "seq_len": cfg.train.seq_len, "limit": args.limit, "world_size": group.world,
                  "device": str(device), "results": results}
        print(format_table(results))
        _write_json(args.out, report, "eval: results")
    return 0


def _write_json(path: Optional[Path], report: dict, what: str) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{what} written to {path}")


def _validation(scorer: Scorer, cfg, tokenizer_sha256: str, limit: Optional[int], log) -> dict:
    try:
        requests = validation_requests(cfg, tokenizer_sha256, limit, log)
    except CompeteSMoEError as err:
        return {"status": "missing", "hint": f"the run's validation data cannot be read ({err}); "
                                            "point --data-cache at its prepared data"}
    return {"status": "ok", **validation_perplexity(scorer, requests)}


def _timed(run: Callable[[], dict]) -> dict:
    start = time.perf_counter()
    result = run()
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _row_summary(result: dict) -> str:
    if result["status"] != "ok":
        return f"missing: {result['hint']}"
    return ", ".join(f"{k} {result[k]:.4g}" for k in ("n",) + _COLUMNS if k in result)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"


def format_table(results: dict[str, dict]) -> str:
    """One row per task: n and the metrics it has; a missing task gets its hint instead."""
    width = max([len(name) for name in results] + [4])
    lines = [f"{'task':<{width}} {'n':>7} " + " ".join(f"{c:>13}" for c in _COLUMNS)]
    for name, result in results.items():
        if result["status"] != "ok":
            lines.append(f"{name:<{width}} {'missing':>7} {result['hint']}")
            continue
        cells = [f"{_number(result[c]):>13}" if c in result else f"{'-':>13}" for c in _COLUMNS]
        lines.append(f"{name:<{width}} {result['n'] if 'n' in result else result['tokens']:>7} " + " ".join(cells))
    return "\n".join(lines)


# -- routing --------------------------------------------------------------------------------------
def _routing(args: argparse.Namespace) -> int:
    from competesmoe.eval.routing import analyze, format_report
    from competesmoe.parallel.mesh import pick_device

    report = analyze(args.paths, pick_device(args.device), args.windows, args.batch_size,
                     data_cache=args.data_cache)
    print(format_report(report))
    _write_json(args.out, report, "routing: report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
