"""Configs of the transformer LM, its MoE layers and CompeteSMoE's competition.

Defaults are the reference values of the method doc (`docs/method.md`, sections 2, 4 and 5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from competesmoe.errors import ConfigError
from competesmoe.kernels.spec import ACTIVATIONS

ROUTERS = ("smoe", "competesmoe", "sigmoid", "xmoe", "sharede_v2", "sharede_v3", "dense")
BALANCE_LOSSES = ("entropy", "switch", "none")
BACKENDS = ("auto", "torch", "triton")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class AdaptiveConfig:
    """The adaptive competition budget (competition.mode=adaptive; model/moe/schedule.py)."""

    # Weight of the newest competition step in a layer's running agreement estimate.
    ema: float = 0.5
    # Fraction of the budget shared equally, so that every layer keeps competing (and being measured).
    floor: float = 0.25
    # The budget falls linearly from L * omega (routers at chance agreement K/E) to
    # min_budget * L * omega (full agreement); 1 keeps it at L * omega.
    min_budget: float = 1.0

    def validate(self, path: str) -> None:
        if not 0.0 < self.ema <= 1.0:
            raise ConfigError(f"{path}.ema must be in (0, 1], got {self.ema}")
        if not 0.0 <= self.floor <= 1.0:
            raise ConfigError(f"{path}.floor must be in [0, 1], got {self.floor}")
        if not 0.0 <= self.min_budget <= 1.0:
            raise ConfigError(f"{path}.min_budget must be in [0, 1], got {self.min_budget}")


COMPETITION_MODES = ("schedule", "adaptive", "always", "never")


@dataclass
class CompetitionConfig:
    # Probability that a layer competes at a step, and the cap on competing layers per step.
    omega: float = 0.07
    a_max: int = 3
    # No competition during the first warmup_fraction * train.steps steps.
    warmup_fraction: float = 0.0
    # Distillation L_D = MSE over all experts + alpha * MSE over the winners, weighted by beta.
    alpha: float = 0.2
    beta: float = 0.001
    # The distillation target is softmax(s / target_temperature); 1 is the paper's softmax(s). The
    # responses s of all experts lie close together, so T = 1 gives a nearly uniform target; T < 1
    # sharpens it (not part of the published method).
    target_temperature: float = 1.0
    # Diversity loss (mean pairwise cosine similarity of the winners' outputs).
    gamma: float = 0.005
    # Entropy balance term on softmax(s) over all experts; not detached unless detach_balance.
    balance_coef: float = 0.005
    # The reference applies softmax twice in that term; True reproduces it exactly.
    balance_double_softmax: bool = False
    # Detaching the balance term stops its gradient from running backward through all experts
    # (competition then costs ~+7% instead of ~+24% training FLOPs) at the price of a deviation.
    detach_balance: bool = False
    # Winner weights: "renorm" (s_i / sum of winners' s, the reference) or "softmax" over winners.
    weights: str = "renorm"
    # "schedule": the paper's seeded omega / A_max table; "adaptive": the same budget (or less, see
    # adaptive.min_budget) steered towards the layers whose router agrees least with the
    # competition; "always" / "never" force every MoE layer (analysis, profiling).
    mode: str = "schedule"
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def validate(self, path: str) -> None:
        if not 0.0 <= self.omega <= 1.0:
            raise ConfigError(f"{path}.omega must be in [0, 1], got {self.omega}")
        if self.a_max < 0:
            raise ConfigError(f"{path}.a_max must be >= 0, got {self.a_max}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"{path}.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        for name in ("alpha", "beta", "gamma", "balance_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name} must be >= 0, got {getattr(self, name)}")
        if self.weights not in ("renorm", "softmax"):
            raise ConfigError(f"{path}.weights must be 'renorm' or 'softmax', got '{self.weights}'")
        if self.target_temperature <= 0:
            raise ConfigError(f"{path}.target_temperature must be > 0, got {self.target_temperature}")
        if self.mode not in COMPETITION_MODES:
            raise ConfigError(f"{path}.mode must be one of {', '.join(COMPETITION_MODES)}, got '{self.mode}'")
        self.adaptive.validate(f"{path}.adaptive")


@dataclass
class MoEConfig:
    router: str = "smoe"
    num_experts: int = 64
    top_k: int = 8
    expert_hidden: int = 128
    activation: str = "relu"
    # Load balancing of the router in normal steps: the reference's entropy regulariser, the
    # Switch/GShard loss E * sum_e f_e P_e, or none.
    balance_loss: str = "entropy"
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    # Router weight init std; None = d^-1/2 * sqrt(2 / n_layers) as in the reference.
    router_init_std: Optional[float] = None
    # Always-on shared experts of the sharede_v2 / sharede_v3 routers (each expert_hidden wide).
    num_shared_experts: int = 1
    # XMoE: routing dimension (None = num_experts / 2), temperature and expert-embedding norm.
    xmoe_dim: Optional[int] = None
    xmoe_temperature: float = 0.3
    xmoe_embedding_norm: float = 1.5
    # Sparse expert implementation: auto picks Triton on a GPU and torch elsewhere.
    backend: str = "auto"
    competition: CompetitionConfig = field(default_factory=CompetitionConfig)

    def validate(self, path: str) -> None:
        if self.router not in ROUTERS:
            raise ConfigError(f"{path}.router: unknown router '{self.router}'; choose one of {', '.join(ROUTERS)}")
        if self.num_experts < 1:
            raise ConfigError(f"{path}.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{path}.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.expert_hidden < 1:
            raise ConfigError(f"{path}.expert_hidden must be >= 1, got {self.expert_hidden}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{path}.activation: unknown activation '{self.activation}'; "
                              f"choose one of {', '.join(ACTIVATIONS)}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise ConfigError(f"{path}.balance_loss must be one of {', '.join(BALANCE_LOSSES)}, "
                              f"got '{self.balance_loss}'")
        if self.balance_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError(f"{path}.balance_coef and {path}.z_loss_coef must be >= 0")
        if self.router_init_std is not None and self.router_init_std <= 0:
            raise ConfigError(f"{path}.router_init_std must be > 0")
        if self.router.startswith("sharede") and self.num_shared_experts < 1:
            raise ConfigError(f"{path}.num_shared_experts must be >= 1 for router {self.router}")
        if self.router == "xmoe":
            if self.routing_dim < 1:
                raise ConfigError(f"{path}.xmoe_dim must be >= 1, got {self.routing_dim}")
            if self.xmoe_temperature <= 0 or self.xmoe_embedding_norm <= 0:
                raise ConfigError(f"{path}.xmoe_temperature and {path}.xmoe_embedding_norm must be > 0")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{path}.backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        self.competition.validate(f"{path}.competition")

    @property
    def has_competition(self) -> bool:
        """The one rule of which routers compete: CompeteSMoE's. The schedule of any other router
        never competes (model/moe/schedule.py: schedule_for), and its layers refuse to."""
        return self.router == "competesmoe"

    @property
    def routing_dim(self) -> int:
        return self.xmoe_dim if self.xmoe_dim is not None else max(1, self.num_experts // 2)


@dataclass
class ModelConfig:
    # None = the tokenizer's size (data.vocab_size) when built from a run config.
    vocab_size: Optional[int] = None
    d_model: int = 512
    n_layers: int = 16
    n_heads: int = 4
    # None = d_model / n_heads.
    head_dim: Optional[int] = None
    # Fraction of each head's dimensions rotated by RoPE (the reference rotates half).
    rope_fraction: float = 0.5
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    # A MoE FFN in every moe_every-th layer (1 = every layer); the others get a dense FFN with the
    # same active parameters (hidden width top_k * expert_hidden).
    moe_every: int = 1
    # "layernorm" (weight and bias, the reference) or "rmsnorm" (weight only, as Llama/Mixtral; with
    # rope_fraction=1, swiglu experts and moe_every=1 the model is exactly transformers' Mixtral).
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    embed_init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self, path: str = "model") -> None:
        if self.vocab_size is None:
            raise ConfigError(f"{path}.vocab_size is not set")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "moe_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"{path}.d_model ({self.d_model}) is not divisible by {path}.n_heads "
                              f"({self.n_heads}); set {path}.head_dim to use another head size")
        if self.head_dim is not None and self.head_dim < 2:
            raise ConfigError(f"{path}.head_dim must be >= 2, got {self.head_dim}")
        if self.norm not in NORMS:
            raise ConfigError(f"{path}.norm must be one of {', '.join(NORMS)}, got '{self.norm}'")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ConfigError(f"{path}.rope_fraction must be in [0, 1], got {self.rope_fraction}")
        self.moe.validate(f"{path}.moe")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dims(self) -> int:
        # RoPE rotates pairs: round the rotated part down to an even count (82 * 0.5 -> 40).
        return 2 * int(self.attn_head_dim * self.rope_fraction / 2)

    def is_moe_layer(self, layer: int) -> bool:
        return layer % self.moe_every == self.moe_every - 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def router_init(self) -> float:
        if self.moe.router_init_std is not None:
            return self.moe.router_init_std
        return self.d_model ** -0.5 * math.sqrt(2.0 / self.n_layers)
