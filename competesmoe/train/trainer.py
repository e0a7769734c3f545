"""The training loop: one device, or many under torchrun with data and expert parallelism.

    result = train(load_config("configs/smoke.yaml", ["run.dir=runs/x"]))

Running the same config with the same `run.dir` again resumes from the newest complete
checkpoint (the run also checkpoints at its end, so a larger `train.steps` continues it).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from competesmoe.config import Config, to_dict, to_yaml
from competesmoe.data.loader import TrainLoader, val_batches
from competesmoe.data.prepare import prepare_data, load_prepared
from competesmoe.errors import CheckpointError, ConfigError
from competesmoe.model.moe.layer import MoEStats
from competesmoe.model.moe.schedule import CompetitionSchedule
from competesmoe.model.transformer import Transformer, lm_loss
from competesmoe.parallel.config import micro_batches
from competesmoe.parallel.mesh import Mesh, init_mesh
from competesmoe.parallel.parallelize import build_engine, parallelize
from competesmoe.train.checkpoint import Checkpointer
from competesmoe.train.metrics import MetricsWriter
from competesmoe.train.optim import lr_at

# The exit code of a run stopped by SIGTERM / SIGUSR1 after saving: the launcher requeues on it.
REQUEUE_EXIT_CODE = 42

# Dense bf16 matmul peaks (FLOP/s) for MFU; devices not listed report no MFU.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: Optional[float]
    stopped_early: bool  # by a preemption signal


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (what Slurm sends before killing or requeueing): the loop finishes
    the step, saves and exits with REQUEUE_EXIT_CODE."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, mesh: Mesh) -> bool:
        """Every rank stops at the same step: a signal seen by any rank stops all of them."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=mesh.device)
        if mesh.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class RoutingLog:
    """Accumulates the MoE layers' statistics between two log lines, on the device."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.reset()

    def reset(self):
        self.load: list[Optional[torch.Tensor]] = [None] * self.n_layers
        self.competed = [0] * self.n_layers
        self.forwards = 0
        self.comp: list[list[MoEStats]] = [[] for _ in range(self.n_layers)]
        self.competition_flops = 0.0

    def add(self, stats: list[MoEStats]) -> None:
        self.forwards += 1
        for i, s in enumerate(stats):
            self.load[i] = s.load if self.load[i] is None else self.load[i] + s.load
            if s.competed:
                self.competed[i] += 1
                self.comp[i].append(s)
                self.competition_flops += s.competition_flops

    def summary(self, mesh: Mesh) -> dict:
        if not self.n_layers or self.load[0] is None:
            return {}
        load = torch.stack(self.load).float()
        if mesh.distributed:
            dist.all_reduce(load)
        frac = load / load.sum(-1, keepdim=True)

        def mean_of(attr):
            return [torch.stack([getattr(s, attr) for s in c]).mean().item() if c else None for c in self.comp]

        return {
            "competed": [c / max(self.forwards, 1) for c in self.competed],
            "load": frac.tolist(),
            "load_max_over_mean": (frac.max(-1).values * frac.shape[-1]).tolist(),
            "s_mean": mean_of("s_mean"), "s_std": mean_of("s_std"),
            "s_entropy": mean_of("s_entropy"), "agreement": mean_of("agreement"),
        }


def _autocast(cfg: Config, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def evaluate(model, tokens, cfg: Config, mesh: Mesh, autocast) -> float:
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


def _prepare_data_once(cfg: Config, mesh: Mesh, log):
    """The first process of each node prepares (or finds cached) data while the others wait,
    then they open what it made. On a shared filesystem, nodes that race to build the same
    dataset each publish it atomically and keep the first complete copy."""
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    prepared = prepare_data(cfg.data, log=log) if first_on_node else None
    if not mesh.distributed:
        return prepared
    directory = [str(prepared.directory) if prepared else None]
    everyone = [None] * mesh.world
    dist.all_gather_object(everyone, directory[0])
    node_leader = next(d for d in reversed(everyone[:mesh.rank + 1]) if d is not None)
    return prepared if first_on_node else load_prepared(Path(node_leader))


def train(cfg: Config) -> TrainResult:
    # The stop signals are caught from the start: one that arrives during setup stops the run
    # after its first step, with a checkpoint.
    with _StopFlag() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: "_StopFlag") -> TrainResult:
    mesh = init_mesh(cfg.parallel.ep, cfg.model.moe.num_experts, cfg.train.device)
    tc = cfg.train
    n_micro = micro_batches(tc.global_batch, tc.micro_batch, mesh.world)
    run_dir = Path(cfg.run.dir)
    log = print if mesh.is_main else (lambda *a, **k: None)
    if mesh.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    data = _prepare_data_once(cfg, mesh, log)
    if data.tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has "
                          f"{data.tokenizer.vocab_size} tokens (data.vocab_size)")

    # Every rank builds the full model from the same seed; parallelize then keeps this rank's
    # experts, so the initial weights do not depend on the layout.
    torch.manual_seed(cfg.seed)
    model = parallelize(Transformer(cfg.model), mesh, cfg.parallel)
    engine = build_engine(model, cfg, mesh, n_micro)
    val_loss: Optional[float] = None
    counts = model.param_counts()
    schedule = CompetitionSchedule(cfg.seed, len(model.moe_layers), tc.steps,
                                   **_schedule_args(cfg))
    loader = TrainLoader(data.train_tokens(), tc.seq_len, tc.global_batch, cfg.seed, mesh.rank, mesh.world)
    checkpointer = Checkpointer(run_dir / "checkpoints", mesh, tc.keep_last, tc.keep_every)

    step = 0
    latest = checkpointer.latest()
    if latest is not None:
        state = checkpointer.load(latest, model, engine)
        _check_resume(state, cfg, log)
        loader.load_state_dict(state["loader"])
        step = state["step"]
        val_loss = state.get("val_loss")
        log(f"resumed from {latest} at step {step}")
    model.train()
    autocast = _autocast(cfg, mesh.device)
    flops_per_token = model.flops_per_token(tc.seq_len)
    peak = peak_flops(mesh.device)
    log(f"model: {counts['total'] / 1e6:.1f}M parameters, {counts['active'] / 1e6:.1f}M active; "
        f"router={cfg.model.moe.router}; world={mesh.world} (ep={mesh.ep}); device={mesh.device}")

    metrics = MetricsWriter(run_dir, cfg.run, tc.steps, step, to_dict(cfg)) if mesh.is_main else None
    routing = RoutingLog(len(model.moe_layers))
    window = _new_window()

    def trainer_state() -> dict:
        return {"loader": loader.state_dict(), "schedule": schedule.state_dict(), "config": to_dict(cfg),
                "params": counts, "val_loss": val_loss}

    def validate() -> float:
        loss = evaluate(model, data.val_tokens(), cfg, mesh, autocast)
        if metrics:
            ppl = math.exp(min(loss, 50))
            metrics.write({"step": step, "val_loss": loss, "val_ppl": ppl},
                          f"step {step}: validation loss {loss:.4f}, perplexity {ppl:.2f}")
        return loss

    if step == 0:  # where a fresh run starts from
        validate()
    stopped = False
    while step < tc.steps:
        lr = lr_at(step, tc)
        engine.set_lr(lr)
        compete = schedule.competes(step)
        inputs, targets = loader.next_batch()
        inputs, targets = inputs.to(mesh.device), targets.to(mesh.device)
        step_loss = torch.zeros((), device=mesh.device)
        step_aux = torch.zeros((), device=mesh.device)
        for x, y in zip(inputs.chunk(n_micro), targets.chunk(n_micro)):
            with autocast():
                out = model(x, compete)
                loss = lm_loss(out.logits, y)
            engine.backward((loss + out.aux_loss) / n_micro)
            step_loss += loss.detach() / n_micro
            step_aux += out.aux_loss.detach() / n_micro
            routing.add(out.moe_stats)
        grad_norm = engine.step()
        step += 1
        window["loss"] += step_loss
        window["aux"] += step_aux
        window["steps"] += 1
        window["tokens"] += tc.global_batch * tc.seq_len
        window["competing"] += sum(compete)
        if metrics:
            metrics.advance()

        if step % tc.log_every == 0 or step == tc.steps:
            stats = torch.stack([window["loss"], window["aux"]]) / window["steps"]
            if mesh.distributed:
                dist.all_reduce(stats)
                stats /= mesh.world
            elapsed = time.perf_counter() - window["start"]
            tokens_per_s = window["tokens"] / elapsed
            comp_flops = routing.competition_flops / window["steps"] * (mesh.world if mesh.distributed else 1)
            record = {"step": step, "loss": stats[0].item(), "aux_loss": stats[1].item(), "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "competing_layers": window["competing"] / window["steps"], "competition_flops": comp_flops,
                      "routing": routing.summary(mesh)}
            if peak:
                record["mfu"] = (flops_per_token * tokens_per_s + comp_flops * window["steps"] / elapsed) / (peak * mesh.world)
            if metrics:
                metrics.write(record, f"step {step}/{tc.steps} loss {record['loss']:.4f} "
                                      f"lr {lr:.2e} {tokens_per_s:,.0f} tok/s")
            routing.reset()
            window = _new_window()

        if step % tc.eval_every == 0 or step == tc.steps:
            val_loss = validate()

        stopped = stop.agreed(mesh)
        if step % tc.ckpt_every == 0 or step == tc.steps or stopped:
            path = checkpointer.save(step, model, engine, trainer_state(), data.tokenizer)
            if metrics:
                metrics.message(f"checkpoint: {path}")
        if stopped:
            log(f"stopped by signal at step {step}; exiting with code {REQUEUE_EXIT_CODE} to be requeued")
            break

    if metrics:
        metrics.close()
    return TrainResult(run_dir=run_dir, step=step, val_loss=val_loss, stopped_early=stopped)


def _new_window() -> dict:
    return {"loss": 0.0, "aux": 0.0, "steps": 0, "tokens": 0, "competing": 0, "start": time.perf_counter()}


def _schedule_args(cfg: Config) -> dict:
    c = cfg.model.moe.competition
    mode = c.mode if cfg.model.moe.router == "competesmoe" else "never"
    return dict(omega=c.omega, a_max=c.a_max, warmup_fraction=c.warmup_fraction, mode=mode)


def _check_resume(state: dict, cfg: Config, log) -> None:
    """A checkpoint of another model was already refused tensor by tensor; here the settings
    that change what the resumed steps would compute are compared."""
    saved = state["config"]
    now = to_dict(cfg)
    if saved["seed"] != now["seed"]:
        raise CheckpointError(f"run.dir holds a run with seed={saved['seed']}, this command has {now['seed']}; "
                              "use another run.dir or the same setting")
    if saved["train"]["steps"] != now["train"]["steps"]:
        log(f"note: train.steps changed from {saved['train']['steps']} to {now['train']['steps']}: the "
              "learning-rate schedule and the competition schedule are those of the new length from here on")
    for key in ("seq_len", "global_batch"):
        if saved["train"][key] != now["train"][key]:
            raise CheckpointError(f"run.dir holds a run with train.{key}={saved['train'][key]}, this command "
                                  f"has {now['train'][key]}; use another run.dir or the same setting")
