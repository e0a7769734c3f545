"""How a run is laid out across processes: expert parallelism and the ZeRO stage."""
from __future__ import annotations

from dataclasses import dataclass

from competesmoe.errors import ConfigError

# parallel.competition_exchange (what each means, and auto's rule: parallel/exchange.py)
EXCHANGES = ("auto", "tokens", "weights")
# parallel.activation_checkpoint (what each recomputes: parallel/activation.py)
ACTIVATION_CHECKPOINTS = ("none", "full", "ffn", "attn")


@dataclass
class ParallelConfig:
    # Expert-parallel group size; data parallelism fills the rest of the world.
    ep: int = 1
    # DeepSpeed ZeRO stage for the optimizer state (0 = plain torch optimizer, 1 or 2 = DeepSpeed).
    zero_stage: int = 0
    # How a competing MoE layer meets all experts under expert parallelism: gather the group's
    # tokens, gather the layer's expert weights, or `auto`: whichever sends fewer bytes for the
    # layer's shape and the step's tokens per rank (rule and crossover: parallel/exchange.py).
    competition_exchange: str = "auto"
    # `auto` gathers weights only if one layer's gathered experts (all E, in the dtype they
    # compute in) take at most this many MB on every rank; `weights` always gathers them.
    competition_weights_max_mb: float = 2048.0
    # Activation checkpointing per transformer block: none, full (keep only the block's input),
    # ffn (recompute the MoE/FFN sublayer), attn (recompute attention); on blocks 0, k, 2k, ...
    # for k = activation_checkpoint_every.
    activation_checkpoint: str = "none"
    activation_checkpoint_every: int = 1
    # torch.compile each transformer block (the MoE layer's routing-dependent parts run eagerly).
    compile: bool = False

    def validate(self, path: str = "parallel") -> None:
        if self.ep < 1:
            raise ConfigError(f"{path}.ep must be >= 1, got {self.ep}")
        if self.zero_stage == 3:
            raise ConfigError(
                f"{path}.zero_stage=3: DeepSpeed's ZeRO-3 does not support MoE expert parameter "
                "groups; use zero_stage=1 or 2 (the optimizer state of experts and dense "
                "parameters is then partitioned, parameters are replicated)")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{path}.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.competition_exchange not in EXCHANGES:
            raise ConfigError(f"{path}.competition_exchange must be one of {', '.join(EXCHANGES)}, "
                              f"got '{self.competition_exchange}'")
        if self.activation_checkpoint not in ACTIVATION_CHECKPOINTS:
            raise ConfigError(f"{path}.activation_checkpoint must be one of {', '.join(ACTIVATION_CHECKPOINTS)}, "
                              f"got '{self.activation_checkpoint}'")
        if self.activation_checkpoint_every < 1:
            raise ConfigError(f"{path}.activation_checkpoint_every must be >= 1, "
                              f"got {self.activation_checkpoint_every}")
        if self.competition_weights_max_mb < 0:
            raise ConfigError(f"{path}.competition_weights_max_mb must be >= 0, got {self.competition_weights_max_mb}")


def check_layout(world: int, ep: int, num_experts: int) -> None:
    """The expert-parallel size must divide the world and the experts."""
    if world % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide the world size {world}: choose an ep "
                          f"among {[d for d in range(1, world + 1) if world % d == 0]}")
    if num_experts % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide model.moe.num_experts={num_experts}")


def micro_batches(global_batch: int, micro_batch: int | None, world: int) -> int:
    """Forwards per rank and step: the global batch splits over the world in whole micro-batches."""
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if global_batch % world or per_rank % micro:
        raise ConfigError(f"train.global_batch={global_batch} must split into {world} ranks x whole "
                          f"micro-batches of train.micro_batch={micro_batch}")
    return per_rank // micro
