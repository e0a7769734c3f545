"""Run the trainer, then crash it at a chosen moment with SIGKILL (no cleanup, as a node failure).

usage: [torchrun ...] tests/workers/train_crash.py MODE STEP CONFIG [key=value ...]
  MODE during-save  rank 1 (or 0 in a single process) dies after writing its shard of the
                    checkpoint of STEP, before the checkpoint is committed
  MODE after-save   every rank dies right after the checkpoint of STEP is committed
  MODE signal-at    STEP:SIGNUM[:COUNT]: the process sends itself signal SIGNUM (COUNT times, default
                    once) while it computes step STEP (counted from 1), as a scheduler or Ctrl-C would
"""
import os
import signal
import sys

import torch.distributed as dist

import competesmoe.train.checkpoint as ckpt
from competesmoe.train.cli import main

# Under `if __name__ == "__main__"`: data preparation spawns worker processes, which import
# this file again and must not run it.
if __name__ == "__main__":
    mode = sys.argv[1]
    step, _, signum = sys.argv[2].partition(":")
    signum, _, count = signum.partition(":")
    step = int(step)
    rank = int(os.environ.get("RANK", 0))
    victim = min(1, int(os.environ.get("WORLD_SIZE", 1)) - 1)

    if mode == "during-save":
        real_close = ckpt.StreamingSafetensors.__exit__

        def close_then_die(self, *exc):
            real_close(self, *exc)  # the rank's shard is written in full
            if f"step_{step:08d}.tmp" in str(self.path) and rank == victim:
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt.StreamingSafetensors.__exit__ = close_then_die
    elif mode == "after-save":
        real_save = ckpt.Checkpointer.save

        def save_then_die(self, at_step, *args, **kwargs):
            path = real_save(self, at_step, *args, **kwargs)
            if at_step == step:
                if dist.is_initialized():
                    dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        ckpt.Checkpointer.save = save_then_die
    elif mode == "signal-at":
        import competesmoe.train.trainer as trainer

        real_step = trainer.train_step
        calls = []

        def step_with_signal(*args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                for _ in range(int(count or 1)):
                    os.kill(os.getpid(), int(signum))
            return real_step(*args, **kwargs)

        trainer.train_step = step_with_signal
    else:
        raise SystemExit(f"unknown mode {mode}")

    sys.exit(main(sys.argv[3:]))
