"""How a run is laid out across processes: expert parallelism and the ZeRO stage."""
from dataclasses import dataclass

from competesmoe.errors import ConfigError


@dataclass
class ParallelConfig:
    # Expert-parallel group size; data parallelism fills the rest of the world.
    ep: int = 1
    # DeepSpeed ZeRO stage for the optimizer state (0 = plain torch optimizer, 1 or 2 = DeepSpeed).
    zero_stage: int = 0

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
