"""Which MoE layers compete at which optimizer step (method doc, section 4).

The schedule is a table of `n_layers x total_steps` booleans computed from a seed, so every rank
derives the same table without communication and a resumed run continues it unchanged: the
table is a pure function of (seed, n_layers, total_steps, omega, a_max, warmup_fraction).

Reference rule: no competition in the warm-up steps. Then for each layer l in order and each step
t, draw u ~ U(0, 1); if u < omega, mark (l, t) when fewer than a_max layers compete at t;
otherwise relocate the draw to the nearest earlier step with room that l does not already use,
failing that the nearest later one (a draw with nowhere to go is dropped). a_max is thus a hard
per-step cap (the competition compute budget of a step) and each layer's rate stays near omega.
"""
from __future__ import annotations

import numpy as np

# Mixed into the seed so the schedule's stream differs from other users of the run seed.
_STREAM = 0x5C4ED


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
    """The competition table of a run, and what the trainer asks of it."""

    def __init__(self, seed: int, n_layers: int, total_steps: int, omega: float, a_max: int,
                 warmup_fraction: float = 0.0, mode: str = "schedule"):
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

    def state_dict(self) -> dict:
        return dict(self.params)
