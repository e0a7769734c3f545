"""The training loop: one device, or many under torchrun with data and expert parallelism.

    result = train(load_config("configs/smoke.yaml", ["run.dir=runs/x"]))

`setup` checks everything it can before any work (device and backend, the run directory, the
newest intact checkpoint and whether this config may resume it, the data), builds the model, the
engine and the data loader, and restores the checkpoint; only then is `config.yaml` written.
`_loop` runs `train_step` (train/step.py) until `train.steps`, logging, validating and
checkpointing on the way. Running the same config with the same `run.dir` again resumes from
the newest intact checkpoint; a larger `train.steps` continues a finished run.

A step whose loss or gradient is not finite is never applied (train.nonfinite); a checkpoint is
never written from non-finite weights. SIGTERM, SIGUSR1 and Ctrl-C stop after the current step
with a checkpoint and exit code 42 (train/signals.py).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from competesmoe.config import Config, to_dict, to_yaml
from competesmoe.data.loader import TrainLoader, val_batches
from competesmoe.data.prepare import PreparedData, load_prepared, prepare_data
from competesmoe.errors import CheckpointError, CompeteSMoEError, ConfigError, DataError, DivergenceError
from competesmoe.model.moe.experts import check_backend
from competesmoe.model.moe.schedule import Schedule, schedule_for
from competesmoe.model.transformer import Transformer
from competesmoe.parallel.config import micro_batches
from competesmoe.parallel.mesh import Mesh, init_mesh
from competesmoe.parallel.parallelize import build_model
from competesmoe.train.checkpoint import Checkpointer
from competesmoe.train.engine import Engine, build_engine
from competesmoe.train.metrics import LogWindow, MetricsWriter, peak_flops
from competesmoe.train.optim import lr_at
from competesmoe.train.resume import check_resume_config, covered
from competesmoe.train.signals import REQUEUE_EXIT_CODE, StopRequest, mark_stopped
from competesmoe.train.step import reduced_agreement, train_step

__all__ = ["train", "TrainResult", "REQUEUE_EXIT_CODE"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: Optional[float]
    stopped_early: bool  # by a stop signal, with a checkpoint


@dataclass
class _Run:
    """Everything the loop works with, as `setup` built or restored it."""

    cfg: Config
    mesh: Mesh
    run_dir: Path
    data: PreparedData
    model: Transformer
    engine: Engine
    loader: TrainLoader
    schedule: Schedule
    checkpointer: Checkpointer
    window: LogWindow
    micro_batches: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    log: Callable[[str], None]
    step: int = 0
    val_loss: Optional[float] = None
    skipped_in_a_row: int = 0


def train(cfg: Config) -> TrainResult:
    # The stop signals are caught from the start: one that arrives during setup stops the run
    # after its first step, with a checkpoint.
    with StopRequest() as stop:
        return _loop(setup(cfg), stop)


def setup(cfg: Config) -> _Run:
    mesh = init_mesh(cfg.parallel.ep, cfg.model.moe.num_experts, cfg.train.device)
    check_backend(cfg.model.moe.backend, mesh.device)
    log = print if mesh.is_main else (lambda *a, **k: None)
    tc = cfg.train
    n_micro = micro_batches(tc.global_batch, tc.micro_batch, mesh.world)
    run_dir = _make_run_dir(cfg.run.dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", mesh, tc.keep_last, tc.keep_every)
    resume = checkpointer.resumable(log)
    if resume is not None:
        check_resume_config(resume.trainer["config"], to_dict(cfg), cfg.run.allow_changes, log, to_dict(Config()))

    data = _prepare_data_once(cfg, mesh, log)
    if data.tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has "
                          f"{data.tokenizer.vocab_size} tokens (data.vocab_size)")
    new_data = resume is not None and resume.trainer.get("data_key", data.directory.name) != data.directory.name
    if new_data and not covered("data", cfg.run.allow_changes):
        raise CheckpointError(f"the text behind data.sources changed since {resume.path} was written (prepared "
                              f"data {resume.trainer['data_key']} then, {data.directory.name} now); use another "
                              "run.dir, or continue on the new data with run.allow_changes=[data]")

    # Each rank builds only its own part (dense weights, its experts), drawn from per-tensor
    # generators of the seed: the initial weights do not depend on the layout.
    torch.manual_seed(cfg.seed)  # for anything else that draws from torch's global generator
    model = build_model(cfg.model, cfg.seed, mesh, cfg.parallel)
    run = _Run(
        cfg=cfg, mesh=mesh, run_dir=run_dir, data=data, model=model,
        engine=build_engine(model, cfg, mesh, n_micro),
        loader=TrainLoader(data.train_tokens(), tc.seq_len, tc.global_batch, cfg.seed, mesh.rank, mesh.world),
        schedule=schedule_for(cfg.model.moe, cfg.seed, len(model.moe_layers), tc.steps),
        checkpointer=checkpointer, window=LogWindow(len(model.moe_layers), mesh.device),
        micro_batches=n_micro, autocast=_autocast(cfg, mesh.device), log=log)
    if resume is not None:
        state = checkpointer.load(resume, model, run.engine)
        run.loader.load_state_dict(state["loader"], same_data=not new_data)
        run.step, run.val_loss = state["step"], state.get("val_loss")
        if "schedule" in state:
            note = run.schedule.load_state_dict(state["schedule"], run.step)
            if note:
                log(f"note: {note}")
        if "log_window" in state:
            run.window.load_state_dict(state["log_window"])
        run.skipped_in_a_row = state.get("skipped_in_a_row", 0)
        log(f"resumed from {resume.path} at step {run.step}")
    if mesh.is_main:
        _write_config(run_dir, cfg)
    counts = model.param_counts()
    log(f"model: {counts['total'] / 1e6:.1f}M parameters, {counts['active'] / 1e6:.1f}M active; "
        f"router={cfg.model.moe.router}; world={mesh.world} (ep={mesh.ep}); device={mesh.device}")
    return run


def _loop(run: _Run, stop: StopRequest) -> TrainResult:
    cfg, mesh = run.cfg, run.mesh
    metrics = MetricsWriter(run.run_dir, cfg.run, cfg.train.steps, run.step, to_dict(cfg)) if mesh.is_main else None
    try:
        stopped = _steps(run, stop, metrics)
    finally:
        if metrics:
            metrics.close()
    return TrainResult(run_dir=run.run_dir, step=run.step, val_loss=run.val_loss, stopped_early=stopped)


def _steps(run: _Run, stop: StopRequest, metrics: Optional[MetricsWriter]) -> bool:
    """Train until train.steps or a stop signal (returns True then)."""
    tc, mesh = run.cfg.train, run.mesh
    flops_per_token, peak = run.model.flops_per_token(tc.seq_len), peak_flops(mesh.device)
    run.model.train()
    if run.step == 0:  # where a fresh run starts from
        _log_validation_loss(run, metrics)
    while run.step < tc.steps:
        lr = lr_at(run.step, tc)
        run.engine.set_lr(lr)
        compete = run.schedule.competes(run.step)
        inputs, targets = (t.to(mesh.device) for t in run.loader.next_batch())
        out = train_step(run.model, run.engine, inputs, targets, compete, run.micro_batches, run.autocast)
        if run.schedule.needs_feedback:
            # A skipped (non-finite) step measured nothing worth keeping; `applied` is the same on every rank.
            agreement = reduced_agreement(out, compete, mesh) if out.applied else [None] * len(compete)
            run.schedule.update(run.step, agreement)
        run.step += 1
        run.window.add_step(out.loss, out.aux_loss, out.applied, tc.global_batch * tc.seq_len, sum(compete))
        for stats in out.moe_stats:
            run.window.routing.add(stats)
        run.skipped_in_a_row = 0 if out.applied else run.skipped_in_a_row + 1
        if metrics:
            metrics.advance()

        diverged = not out.applied and (tc.nonfinite == "stop" or run.skipped_in_a_row > tc.max_skipped_steps)
        if run.step % tc.log_every == 0 or run.step == tc.steps or diverged:
            record = run.window.record(run.step, lr, out.grad_norm, mesh, flops_per_token, peak)
            schedule_state = run.schedule.summary()  # the adaptive budget's rates and estimates
            if schedule_state:
                record["schedule"] = schedule_state
            if metrics:
                metrics.write(record, _summary(record, tc.steps))
            run.window = LogWindow(len(run.model.moe_layers), mesh.device)
        if diverged:
            raise _divergence(run, f"step {run.step}: the loss or the gradient norm is not finite "
                                   f"({run.skipped_in_a_row} such step(s) in a row, train.nonfinite={tc.nonfinite}, "
                                   f"train.max_skipped_steps={tc.max_skipped_steps}); the update was not applied")

        if run.step % tc.eval_every == 0 or run.step == tc.steps:
            _log_validation_loss(run, metrics)
        stopped = stop.agreed(mesh.device, mesh.distributed)
        if stopped or ((run.step % tc.ckpt_every == 0 or run.step == tc.steps) and _checkpoint_due(run)):
            _save(run, metrics)
        if stopped:
            run.log(f"stopped by signal at step {run.step}; exiting with code {REQUEUE_EXIT_CODE} to be requeued")
            if mesh.is_main:
                mark_stopped(run.step)
            return True
    return False


def _summary(record: dict, total_steps: int) -> str:
    loss = f"{record['loss']:.4f}" if math.isfinite(record["loss"]) else "not finite"
    skipped = f", {record['skipped_steps']} step(s) skipped (not finite)" if record["skipped_steps"] else ""
    return (f"step {record['step']}/{total_steps} loss {loss} lr {record['lr']:.2e} "
            f"{record['tokens_per_s']:,.0f} tok/s{skipped}")


def _divergence(run: _Run, what: str) -> DivergenceError:
    latest = run.checkpointer.latest()
    if latest:
        where = (f"the last good checkpoint is {latest}: rerunning resumes from it; to resume with a lower "
                 "train.lr add run.allow_changes=[train.lr]")
    else:
        where = "no checkpoint was written yet: start again with a lower train.lr or more train.warmup_steps"
    return DivergenceError(f"{what}; {where}. See the README's 'When things go wrong'")


def _checkpoint_due(run: _Run) -> bool:
    """No regular checkpoint in the middle of non-finite steps: the state they started from is
    suspect, and a new checkpoint would push an older, better one out of train.keep_last."""
    if run.skipped_in_a_row:
        run.log(f"step {run.step}: checkpoint postponed, the last {run.skipped_in_a_row} step(s) were not finite")
    return run.skipped_in_a_row == 0


def _save(run: _Run, metrics: Optional[MetricsWriter]) -> None:
    # Checked on every rank, so that all of them refuse together.
    if not run.engine.params_finite():
        raise _divergence(run, f"step {run.step}: the weights are not finite; no checkpoint was written")
    state = {"loader": run.loader.state_dict(), "schedule": run.schedule.state_dict(), "config": to_dict(run.cfg),
             "params": run.model.param_counts(), "val_loss": run.val_loss, "data_key": run.data.directory.name,
             "log_window": run.window.state_dict(), "skipped_in_a_row": run.skipped_in_a_row,
             "weights_finite": True}
    path = run.checkpointer.save(run.step, run.model, run.engine, state, run.data.tokenizer)
    if metrics:
        metrics.message(f"checkpoint: {path}")


def _log_validation_loss(run: _Run, metrics: Optional[MetricsWriter]) -> None:
    run.val_loss = validation_loss(run.model, run.data.val_tokens(), run.cfg, run.mesh, run.autocast)
    if metrics:
        finite = math.isfinite(run.val_loss)
        ppl = math.exp(min(run.val_loss, 50)) if finite else math.nan
        shown = f"{run.val_loss:.4f}, perplexity {ppl:.2f}" if finite else "not finite"
        metrics.write({"step": run.step, "val_loss": run.val_loss, "val_ppl": ppl},
                      f"step {run.step}: validation loss {shown}")


@torch.no_grad()
def validation_loss(model, tokens, cfg: Config, mesh: Mesh, autocast) -> float:
    """Mean next-token loss over the first train.eval_batches validation batches."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=mesh.device)
    batch = cfg.train.micro_batch or cfg.train.global_batch // mesh.world
    for inputs, targets in val_batches(tokens, cfg.train.seq_len, batch, cfg.train.eval_batches,
                                       mesh.rank, mesh.world):
        inputs, targets = inputs.to(mesh.device), targets.to(mesh.device)
        with autocast():
            logits = model(inputs).logits
        total[0] += torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").double()
        total[1] += targets.numel()
    if mesh.distributed:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp_min(1)).item()


def _autocast(cfg: Config, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _make_run_dir(path: str) -> Path:
    """Every rank checks (and one creates) the run directory, so that all fail alike."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={path} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.dir={path} cannot be created: {err.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={path} is not writable")
    return run_dir


def _write_config(run_dir: Path, cfg: Config) -> None:
    """config.yaml is the config of the latest start; a different earlier one is kept as
    config.1.yaml, config.2.yaml, ... (oldest first)."""
    path, text = run_dir / "config.yaml", to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        os.replace(path, run_dir / f"config.{n}.yaml")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prepare_data_once(cfg: Config, mesh: Mesh, log) -> PreparedData:
    """The first process of each node prepares (or finds cached) data while the others wait,
    then they open what it made. On a shared filesystem, nodes that race to build the same
    dataset each publish it atomically and keep the first complete copy. An error on any node
    stops every rank with its message (instead of leaving the others waiting)."""
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    prepared, error = None, None
    if first_on_node:
        try:
            prepared = prepare_data(cfg.data, log=log)
        except CompeteSMoEError as err:
            if not mesh.distributed:
                raise
            error = str(err)
    if not mesh.distributed:
        return prepared
    everyone = [None] * mesh.world
    dist.all_gather_object(everyone, (str(prepared.directory) if prepared else None, error))
    errors = [e for _, e in everyone if e]
    if errors:
        raise DataError(errors[0])
    node_leader = next(d for d, _ in reversed(everyone[:mesh.rank + 1]) if d is not None)
    return prepared if first_on_node else load_prepared(Path(node_leader))



