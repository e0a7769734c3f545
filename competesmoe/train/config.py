"""Optimisation, schedule, logging and checkpoint cadence of a training run."""
from dataclasses import dataclass, field
from typing import List, Optional

from competesmoe.errors import ConfigError


@dataclass
class RunConfig:
    # Everything a run writes goes here: resolved config, metrics.jsonl, checkpoints, logs.
    dir: str = "runs/default"
    # wandb is used only when a project is named; tests and the smoke run leave it off.
    wandb_project: Optional[str] = None
    wandb_mode: str = "online"  # online | offline
    # Progress display: auto (a bar in an interactive terminal, log lines otherwise) | bar | log.
    progress: str = "auto"
    # Resuming refuses a change of the model, the method, the data or the optimisation (see
    # train/resume.py); keys listed here, or below a listed prefix such as model.moe.competition,
    # may change. Cadence, logging, the layout and train.steps may always change.
    allow_changes: List[str] = field(default_factory=list)

    def validate(self, path: str = "run") -> None:
        if not self.dir:
            raise ConfigError(f"{path}.dir must be set")
        if self.wandb_mode not in ("online", "offline"):
            raise ConfigError(f"{path}.wandb_mode must be online or offline, got '{self.wandb_mode}'")
        if self.progress not in ("auto", "bar", "log"):
            raise ConfigError(f"{path}.progress must be auto, bar or log, got '{self.progress}'")


@dataclass
class TrainConfig:
    steps: int = 1000
    # Sequences per optimizer step summed over data-parallel ranks. Each rank runs its share in
    # forwards of micro_batch sequences and accumulates gradients (None = its whole share at once).
    global_batch: int = 64
    micro_batch: Optional[int] = None
    seq_len: int = 1024
    # The learning rate of optimizer step t (0-based): lr * (t + 1) / warmup_steps during the
    # warm-up, then a half cosine from lr down to lr * min_lr_ratio, reached at t = steps.
    lr: float = 2.5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    # torch's AdamW; its decoupled weight decay applies to matrices (attention, FFN, experts,
    # routers, head), not to norms, biases or embeddings (token, XMoE's expert embeddings).
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # The whole gradient (every parameter, all ranks) is scaled to a global L2 norm of at most
    # grad_clip (0 = off); metrics.jsonl logs grad_norm before clipping.
    grad_clip: float = 0.1
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    # auto = bf16 autocast on GPU and fp32 on CPU.
    precision: str = "auto"  # auto | fp32 | bf16
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 500
    keep_last: int = 2
    # Checkpoints at multiples of keep_every are kept for good (milestones; 0 = none), e.g. for
    # the expert change rate over a run.
    keep_every: int = 0
    # A step whose loss or gradient norm is not finite on some rank is never applied. "skip" goes
    # on with the next batch, stopping after max_skipped_steps such steps in a row; "stop" stops
    # at the first. Stopping exits with code 3 and names the last good checkpoint.
    nonfinite: str = "skip"
    max_skipped_steps: int = 10

    def validate(self, path: str = "train") -> None:
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ConfigError(f"{path}.micro_batch must be >= 1 (or null), got {self.micro_batch}")
        for name in ("steps", "global_batch", "seq_len", "log_every", "eval_every",
                     "eval_batches", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_every < 0:
            raise ConfigError(f"{path}.keep_every must be >= 0 (0 = no milestones), got {self.keep_every}")
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{path}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{path}.warmup_steps must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"{path}.grad_clip must be >= 0 (0 disables clipping)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{path}.device must be auto, cpu or cuda, got '{self.device}'")
        if self.nonfinite not in ("skip", "stop"):
            raise ConfigError(f"{path}.nonfinite must be skip or stop, got '{self.nonfinite}'")
        if self.max_skipped_steps < 1:
            raise ConfigError(f"{path}.max_skipped_steps must be >= 1 (use {path}.nonfinite=stop to stop "
                              f"at the first non-finite step), got {self.max_skipped_steps}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{path}.precision must be auto, fp32 or bf16, got '{self.precision}'")

