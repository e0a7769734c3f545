"""Which MoE layers compete at which optimizer step (method doc, section 4).

Two schedules, chosen by `model.moe.competition.mode`; both never let more than `a_max` layers
compete in one step, skip the warm-up steps, and take the same decision on every rank.

`schedule` (the reference) is a table of `n_layers x total_steps` booleans computed from a seed:
every rank derives the same table without communication and a resumed run continues it, since
the table is a pure function of (seed, n_layers, total_steps, omega, a_max, warmup_fraction).
For each layer l in order and each step t, draw u ~ U(0, 1); if u < omega, mark (l, t) when
fewer than a_max layers compete at t; otherwise relocate the draw to the nearest earlier step
with room that l does not already use, failing that the nearest later one (a draw with nowhere
to go is dropped). Each layer's rate stays near omega.

`adaptive` spends the same budget, L * omega competing layer-steps per step on average, where
the router imitates the competition worst. Each layer keeps an estimate a_l of its router's
agreement with the competition, |T^R intersect T^C| / K, updated on the steps it competes (an
exponential average, `adaptive.ema` the weight of the newest step; the trainer passes the value
averaged over micro-batches and reduced over ranks). Its share of the budget follows its miss
rate m_l = 1 - a_l, with a floor so that every layer keeps being measured:

    R_t = L * omega * b_t,   p_l = min(1, R_t * (f / L + (1 - f) * m_l / sum_j m_j)),   f = adaptive.floor

(a layer not yet measured counts as a router at chance, a_l = K / E). With `adaptive.min_budget`
rho < 1 the budget shrinks as the routers catch up: b_t = 1 - (1 - rho) * clip((mean_l a_l - K/E)
/ (1 - K/E), 0, 1), from omega at chance agreement down to rho * omega at full agreement; rho = 1
(the default) keeps b_t = 1.

The rates become decisions by credits (error diffusion) rather than draws: each layer gains p_l
credit per step, starting from a phase in [0, 1) drawn from (seed, layer); at a step, the layers
with at least one credit compete, most credit first, at most a_max of them, and each pays one
credit. Credit is capped at 2, so a layer held back by the cap owes at most one step. Hence, over
the steps after the warm-up, each layer competes sum_t p_l(t) times up to 2 (plus what the cap
drops when L * omega > a_max), and the average rate is omega * mean(b_t) within 2 / steps: never
above omega + 1 / steps. The decision at step t depends only on the state after step t - 1, which
the trainer saves in every checkpoint (floats survive JSON exactly), so a resumed run continues it
exactly; no rank draws anything of its own.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Union

import numpy as np

from competesmoe.errors import CheckpointError
from competesmoe.model.config import CompetitionConfig, MoEConfig

# Mixed into the seed so the schedule's stream differs from other users of the run seed.
_STREAM = 0x5C4ED
# The adaptive schedule's credit cap: a layer deferred by a_max owes at most one extra step.
CREDIT_CAP = 2.0


def build_schedule(seed: int, n_layers: int, total_steps: int, omega: float, a_max: int,
                   warmup_fraction: float = 0.0) -> np.ndarray:
    table = np.zeros((n_layers, total_steps), dtype=bool)
    warm = int(warmup_fraction * total_steps)
    span = total_steps - warm
    if span <= 0 or omega <= 0 or a_max <= 0:
        return table
    rng = np.random.default_rng([_STREAM, seed])
    active = np.zeros(span, dtype=np.int64)  # competing layers per step, so far
    for layer in range(n_layers):
        draws = rng.random(span) < omega
        marked = table[layer, warm:]
        for t in np.flatnonzero(draws):
            # A step the layer already holds (from an earlier relocation) stays marked once.
            if marked[t]:
                continue
            if active[t] < a_max:
                marked[t] = True
                active[t] += 1
                continue
            room = (active < a_max) & ~marked
            earlier = np.flatnonzero(room[:t])
            if earlier.size:
                j = earlier[-1]
            else:
                later = np.flatnonzero(room[t + 1:])
                if not later.size:
                    continue
                j = t + 1 + later[0]
            marked[j] = True
            active[j] += 1
    return table


class CompetitionSchedule:
    """The fixed competition table of a run (modes schedule, always, never), and what the trainer
    asks of every schedule: `competes(step)`, `update(step, agreement)` after the step, and its
    state for checkpoints."""

    needs_feedback = False  # the trainer passes no statistics to a fixed table

    def __init__(self, seed: int, n_layers: int, total_steps: int, omega: float, a_max: int,
                 warmup_fraction: float = 0.0, mode: str = "schedule"):
        if mode not in ("schedule", "always", "never"):
            raise ValueError(f"a fixed competition schedule has mode schedule, always or never, not {mode!r}")
        self.params = dict(seed=seed, n_layers=n_layers, total_steps=total_steps, omega=omega,
                           a_max=a_max, warmup_fraction=warmup_fraction, mode=mode)
        if mode == "schedule":
            self.table = build_schedule(seed, n_layers, total_steps, omega, a_max, warmup_fraction)
        else:
            self.table = np.full((n_layers, total_steps), mode == "always", dtype=bool)

    def competes(self, step: int) -> list[bool]:
        """The competing MoE layers at optimizer step `step` (0-based); none past the end."""
        if not 0 <= step < self.table.shape[1]:
            return [False] * self.table.shape[0]
        return self.table[:, step].tolist()

    def update(self, step: int, agreement: Sequence[Optional[float]]) -> None:
        """A fixed table does not depend on what happened."""

    def summary(self) -> dict:
        """What a log line records of the schedule's state (nothing: the table is fixed)."""
        return {}

    def checksum(self) -> str:
        return hashlib.sha256(np.packbits(self.table).tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return dict(self.params, table_sha256=self.checksum())

    def load_state_dict(self, state: dict, step: int) -> Optional[str]:
        """Check a checkpoint's schedule against this one before resuming at `step`. Returns a note
        when the parameters changed (the config check allowed it: the table from `step` on is this
        one's); raises when the same parameters give another table (the schedule's code, or
        numpy's generator, changed since the checkpoint was written)."""
        saved = {k: v for k, v in state.items() if k in self.params}
        if saved != self.params:
            return _changed_note(state, self.params, step)
        if "table_sha256" in state and state["table_sha256"] != self.checksum():
            raise CheckpointError(f"the competition schedule of these parameters ({_describe(self.params)}) is not the "
                                  "one the checkpoint was trained with: the schedule code or numpy's random generator "
                                  "changed since; resume with the version that wrote it, or use another run.dir")
        return None


class AdaptiveSchedule:
    """The adaptive competition budget (mode `adaptive`, see the module docstring)."""

    needs_feedback = True

    def __init__(self, seed: int, n_layers: int, total_steps: int, omega: float, a_max: int,
                 warmup_fraction: float = 0.0, ema: float = 0.5, floor: float = 0.25,
                 min_budget: float = 1.0, chance: float = 0.0):
        self.params = dict(seed=seed, n_layers=n_layers, total_steps=total_steps, omega=omega, a_max=a_max,
                           warmup_fraction=warmup_fraction, mode="adaptive", ema=ema, floor=floor,
                           min_budget=min_budget, chance=chance)
        self.n_layers, self.omega, self.a_max = n_layers, omega, a_max
        self.ema, self.floor, self.min_budget, self.chance = ema, floor, min_budget, chance
        self.warm = int(warmup_fraction * total_steps)
        phases = np.random.default_rng([_STREAM, seed, 1]).random(n_layers)
        self.credit: list[float] = [float(p) for p in phases]
        self.agreement: list[Optional[float]] = [None] * n_layers
        self.next_step = 0  # the step whose decision comes next; update() advances it
        self.competitions = [0] * n_layers
        self.dropped = 0.0  # credit lost at the cap (only when L * omega > a_max, or in bursts)

    # -- the rule ----------------------------------------------------------------------------------
    def _estimates(self) -> list[float]:
        return [self.chance if a is None else a for a in self.agreement]

    def budget(self) -> float:
        """b_t: the fraction of the configured budget L * omega spent now."""
        if self.min_budget >= 1.0:
            return 1.0
        mean = sum(self._estimates()) / self.n_layers
        caught_up = min(max((mean - self.chance) / max(1.0 - self.chance, 1e-12), 0.0), 1.0)
        return 1.0 - (1.0 - self.min_budget) * caught_up

    def rates(self) -> list[float]:
        """p_l: each layer's expected competitions per step from the current estimates."""
        total = self.n_layers * self.omega * self.budget()
        miss = [1.0 - a for a in self._estimates()]
        spread = sum(miss)
        shares = [m / spread if spread > 0 else 1.0 / self.n_layers for m in miss]
        return [min(1.0, total * (self.floor / self.n_layers + (1.0 - self.floor) * s)) for s in shares]

    def _decide(self) -> tuple[list[float], list[bool]]:
        """Credit after this step's accrual, and who competes (most credit first, at most a_max)."""
        credit = [c + p for c, p in zip(self.credit, self.rates())]
        ready = sorted((i for i in range(self.n_layers) if credit[i] >= 1.0), key=lambda i: (-credit[i], i))
        chosen = set(ready[:self.a_max])
        return credit, [i in chosen for i in range(self.n_layers)]

    # -- what the trainer calls --------------------------------------------------------------------
    def competes(self, step: int) -> list[bool]:
        if step != self.next_step:
            raise RuntimeError(f"the adaptive competition schedule is at step {self.next_step}, asked for {step}")
        if step < self.warm or self.omega <= 0 or self.a_max <= 0:
            return [False] * self.n_layers
        return self._decide()[1]

    def update(self, step: int, agreement: Sequence[Optional[float]]) -> None:
        """After step `step`: pay for who competed, and fold in the agreement each competing layer
        measured (the same values on every rank; None where a layer did not compete or the step
        was not applied)."""
        if step != self.next_step:
            raise RuntimeError(f"the adaptive competition schedule is at step {self.next_step}, updated for {step}")
        if step >= self.warm and self.omega > 0 and self.a_max > 0:
            credit, chosen = self._decide()
            for i in range(self.n_layers):
                owed = credit[i] - (1.0 if chosen[i] else 0.0)
                self.dropped += max(owed - CREDIT_CAP, 0.0)
                self.credit[i] = min(owed, CREDIT_CAP)
                if chosen[i]:
                    self.competitions[i] += 1
                    new, old = agreement[i], self.agreement[i]
                    if new is not None:
                        self.agreement[i] = new if old is None else (1 - self.ema) * old + self.ema * new
        self.next_step = step + 1

    def summary(self) -> dict:
        return {"budget": self.budget(), "rates": self.rates(), "agreement_estimate": list(self.agreement)}

    def state_dict(self) -> dict:
        return dict(self.params, next_step=self.next_step, credit=list(self.credit), agreement=list(self.agreement),
                    competitions=list(self.competitions), dropped=self.dropped)

    def load_state_dict(self, state: dict, step: int) -> Optional[str]:
        """Continue the checkpoint's adaptive state at `step`. A checkpoint of another mode starts
        the adaptive schedule afresh there (a note says so); changed coefficients (allowed by the
        config check) apply from `step` on with the saved estimates."""
        self.next_step = step
        if state.get("mode") != "adaptive":
            return f"the competition schedule changes from mode {state.get('mode')!r} to 'adaptive' at step {step}: " \
                   "its estimates start afresh"
        if state["n_layers"] != self.n_layers:
            raise CheckpointError(f"the checkpoint's adaptive schedule has {state['n_layers']} MoE layers, this model "
                                  f"{self.n_layers}")
        if state["next_step"] != step:
            raise CheckpointError(f"the checkpoint's adaptive schedule is at step {state['next_step']}, its weights at "
                                  f"step {step}: the checkpoint is inconsistent")
        self.credit = [float(c) for c in state["credit"]]
        self.agreement = [None if a is None else float(a) for a in state["agreement"]]
        self.competitions = [int(c) for c in state["competitions"]]
        self.dropped = float(state["dropped"])
        saved = {k: v for k, v in state.items() if k in self.params}
        return None if saved == self.params else _changed_note(state, self.params, step)


Schedule = Union[CompetitionSchedule, AdaptiveSchedule]


def schedule_for(moe: MoEConfig, seed: int, n_layers: int, total_steps: int) -> Schedule:
    """The competition schedule of a run: competition.mode for a router that competes
    (MoEConfig.has_competition), never for the others."""
    mode = moe.competition.mode if moe.has_competition else "never"
    return build_competition_schedule(seed, n_layers, total_steps, moe.competition, mode,
                                      chance=moe.top_k / moe.num_experts)


def build_competition_schedule(seed: int, n_layers: int, total_steps: int, cfg: CompetitionConfig,
                               mode: Optional[str] = None, chance: float = 0.0) -> Schedule:
    """The schedule `cfg.mode` (or `mode`, e.g. "never" for a router without competition) names;
    `chance` = K / E is the agreement of a router that picks at random (the adaptive mode's
    starting estimate)."""
    mode = cfg.mode if mode is None else mode
    if mode == "adaptive":
        a = cfg.adaptive
        return AdaptiveSchedule(seed, n_layers, total_steps, cfg.omega, cfg.a_max, cfg.warmup_fraction,
                                ema=a.ema, floor=a.floor, min_budget=a.min_budget, chance=chance)
    return CompetitionSchedule(seed, n_layers, total_steps, cfg.omega, cfg.a_max, cfg.warmup_fraction, mode)


def _describe(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _changed_note(state: dict, params: dict, step: int) -> str:
    changed = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in params.items() if state.get(k) != v]
    return f"the competition schedule from step {step} on follows the new parameters ({'; '.join(changed)})"
