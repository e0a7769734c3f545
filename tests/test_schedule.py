"""The competition schedule: cap, rate, determinism, resume, warm-up (method doc, section 4)."""
import functools
import json
import random

import numpy as np
import pytest

from competesmoe.errors import CheckpointError
from competesmoe.model.config import CompetitionConfig
from competesmoe.model.moe.schedule import (
    AdaptiveSchedule,
    CompetitionSchedule,
    build_competition_schedule,
    build_schedule,
)


def reference_schedule(uniforms, omega, a_max, warm):
    """The rule written step by step over a given table of uniforms [L, steps]."""
    n_layers, steps = uniforms.shape
    marked = [[False] * steps for _ in range(n_layers)]

    def count(t):
        return sum(marked[layer][t] for layer in range(n_layers))

    for layer in range(n_layers):
        for t in range(warm, steps):
            if uniforms[layer, t] >= omega or marked[layer][t]:
                continue
            if count(t) < a_max:
                marked[layer][t] = True
                continue
            candidates = [j for j in range(t - 1, warm - 1, -1) if count(j) < a_max and not marked[layer][j]]
            candidates += [j for j in range(t + 1, steps) if count(j) < a_max and not marked[layer][j]]
            if candidates:
                marked[layer][candidates[0]] = True
    return np.array(marked)


def test_matches_the_rule_written_out():
    seed, n_layers, steps, omega, a_max, warmup = 7, 6, 300, 0.4, 2, 0.1
    warm = int(warmup * steps)
    rng = np.random.default_rng([0x5C4ED, seed])
    uniforms = np.ones((n_layers, steps))
    for layer in range(n_layers):
        uniforms[layer, warm:] = rng.random(steps - warm)
    want = reference_schedule(uniforms, omega, a_max, warm)
    got = build_schedule(seed, n_layers, steps, omega, a_max, warmup)
    assert (got == want).all()
    # this setting is crowded enough that relocation happened: more than a_max draws at some step
    assert ((uniforms < omega).sum(0) > a_max).any()


def test_cap_never_exceeded_and_rate_near_omega():
    table = build_schedule(seed=0, n_layers=16, total_steps=20000, omega=0.07, a_max=3)
    assert table.sum(0).max() <= 3
    rates = table.mean(1)
    # binomial std of a rate over 20000 steps is ~0.0018; relocation keeps draws, so 0.006 is wide
    assert np.abs(rates - 0.07).max() < 0.006
    assert table.sum(0).mean() == pytest.approx(16 * 0.07, abs=0.05)


def test_tight_cap_still_holds():
    table = build_schedule(seed=1, n_layers=16, total_steps=500, omega=0.5, a_max=2)
    assert table.sum(0).max() <= 2
    assert table.sum() == 2 * 500  # oversubscribed: every slot is filled, the rest dropped


def test_same_seed_same_table_on_every_rank_and_different_seed_differs():
    a = CompetitionSchedule(seed=3, n_layers=8, total_steps=1000, omega=0.1, a_max=2)
    b = CompetitionSchedule(seed=3, n_layers=8, total_steps=1000, omega=0.1, a_max=2)
    c = CompetitionSchedule(seed=4, n_layers=8, total_steps=1000, omega=0.1, a_max=2)
    assert all(a.competes(t) == b.competes(t) for t in range(1000))
    assert any(a.competes(t) != c.competes(t) for t in range(1000))


def test_resume_continues_the_same_schedule():
    full = CompetitionSchedule(seed=11, n_layers=4, total_steps=400, omega=0.2, a_max=1)
    remaining = [full.competes(t) for t in range(150, 400)]
    resumed = CompetitionSchedule(**full.params)
    assert resumed.load_state_dict(full.state_dict(), 150) is None
    assert [resumed.competes(t) for t in range(150, 400)] == remaining


def test_warmup_respected():
    table = build_schedule(seed=0, n_layers=4, total_steps=1000, omega=0.3, a_max=4, warmup_fraction=0.25)
    assert not table[:, :250].any()
    assert table[:, 250:].mean() == pytest.approx(0.3, abs=0.05)


def test_forced_modes_and_out_of_range_steps():
    always = CompetitionSchedule(0, 3, 10, 0.07, 3, mode="always")
    never = CompetitionSchedule(0, 3, 10, 0.07, 3, mode="never")
    assert always.competes(5) == [True] * 3 and never.competes(5) == [False] * 3
    assert always.competes(10) == [False] * 3


# -- the adaptive budget (mode=adaptive) -----------------------------------------------------------

class PlainAdaptive:
    """The adaptive rule of the schedule module's docstring, written out step by step."""

    def __init__(self, phases, omega, a_max, warm, ema, floor, min_budget, chance):
        self.credit = list(phases)
        self.agree = [None] * len(phases)
        self.omega, self.a_max, self.warm = omega, a_max, warm
        self.ema, self.floor, self.min_budget, self.chance = ema, floor, min_budget, chance

    def step(self, t, measure):
        """The decision at step t; then the update with measure(layer) for the competing layers."""
        L = len(self.credit)
        if t < self.warm:
            return [False] * L
        a = [self.chance if x is None else x for x in self.agree]
        mean_a = sum(a) / L
        caught_up = min(1.0, max(0.0, (mean_a - self.chance) / (1 - self.chance)))
        budget = L * self.omega * (1 - (1 - self.min_budget) * caught_up)
        miss = [1 - x for x in a]
        p = [min(1.0, budget * (self.floor / L + (1 - self.floor) * m / sum(miss))) for m in miss]
        credit = [c + r for c, r in zip(self.credit, p)]
        decision = [False] * L
        for _ in range(self.a_max):  # repeatedly take the layer with the most credit >= 1
            best = None
            for layer in range(L):
                if not decision[layer] and credit[layer] >= 1 and (best is None or credit[layer] > credit[best]):
                    best = layer
            if best is not None:
                decision[best] = True
        for layer in range(L):
            self.credit[layer] = min(2.0, credit[layer] - decision[layer])
            if decision[layer]:
                x = measure(layer)
                previous = self.agree[layer]
                self.agree[layer] = x if previous is None else (1 - self.ema) * previous + self.ema * x
        return decision


def synthetic_agreement(seed, n_layers):
    """Agreement that differs by layer (worse for low layers), with noise: the same function for
    every schedule it is fed to."""
    rng = random.Random(seed)
    return lambda t, layer: min(1.0, max(0.0, 0.2 + 0.5 * layer / max(n_layers - 1, 1) + rng.gauss(0, 0.05)))


def run_adaptive(schedule, steps, agreement):
    decisions = []
    for t in range(steps):
        c = schedule.competes(t)
        schedule.update(t, [agreement(t, layer) if ci else None for layer, ci in enumerate(c)])
        decisions.append(c)
    return np.array(decisions).T  # [layers, steps]


@pytest.mark.parametrize("min_budget", [1.0, 0.4])
def test_adaptive_matches_the_rule_written_out(min_budget):
    n_layers, steps, omega, a_max, warmup = 6, 3000, 0.2, 2, 0.1
    sched = AdaptiveSchedule(5, n_layers, steps, omega, a_max, warmup, ema=0.3, floor=0.2,
                             min_budget=min_budget, chance=0.25)
    phases = np.random.default_rng([0x5C4ED, 5, 1]).random(n_layers)
    plain = PlainAdaptive(phases, omega, a_max, int(warmup * steps), 0.3, 0.2, min_budget, 0.25)
    rng_a, rng_b = synthetic_agreement(0, n_layers), synthetic_agreement(0, n_layers)
    got = run_adaptive(sched, steps, rng_a)
    want = np.array([plain.step(t, functools.partial(rng_b, t)) for t in range(steps)]).T
    assert (got == want).all()
    assert got.sum(0).max() == a_max  # the cap was reached, and never passed


def test_adaptive_rate_within_the_stated_bound_and_cap():
    """Over T steps the rate is omega within 2 / T (no decay), never above omega + 1 / T."""
    n_layers, steps, omega, a_max = 16, 20000, 0.07, 3
    sched = AdaptiveSchedule(0, n_layers, steps, omega, a_max, chance=2 / 16)
    table = run_adaptive(sched, steps, synthetic_agreement(1, n_layers))
    assert table.sum(0).max() <= a_max
    rate = table.mean()
    assert omega - 2 / steps <= rate <= omega + 1 / steps
    assert sched.dropped == 0.0
    # worse routers compete more: the rate falls with the layer's agreement (rising with the layer here)
    rates = table.mean(1)
    assert rates[0] > 1.8 * rates[-1] and (np.diff(rates) < 0.002).all()
    assert rates.min() >= 0.25 * omega * 0.9  # the floor keeps every layer measured


def test_adaptive_budget_decays_as_agreement_rises():
    n_layers, steps, omega, a_max = 8, 10000, 0.1, 3
    sched = AdaptiveSchedule(2, n_layers, steps, omega, a_max, min_budget=0.5, chance=0.125)
    high = lambda t, layer: 0.9  # noqa: E731  caught up: (0.9 - 0.125) / 0.875 of the way to full agreement
    table = run_adaptive(sched, steps, high)
    budget = 1 - 0.5 * (0.9 - 0.125) / 0.875
    assert sched.budget() == pytest.approx(budget)
    # after the first measurements the rate is omega * budget (< omega), within a few steps' slack
    assert table[:, 1000:].mean() == pytest.approx(omega * budget, abs=0.003)
    assert table.mean() <= omega


def test_adaptive_shifts_the_budget_when_a_router_catches_up():
    n_layers, steps, omega = 4, 8000, 0.15
    sched = AdaptiveSchedule(3, n_layers, steps, omega, 2, chance=0.125)
    # layer 0 agrees badly for the first half, then catches up with the others
    agreement = lambda t, layer: (0.2 if t < steps // 2 else 0.8) if layer == 0 else 0.8  # noqa: E731
    table = run_adaptive(sched, steps, agreement)
    first, second = table[0, 500:steps // 2].mean(), table[0, steps // 2 + 500:].mean()
    # misses 0.8 vs 0.2 x 3: layer 0's share is 0.25 / 4 + 0.75 * 0.8 / 1.4 of 4 * omega (~2 omega)
    assert first == pytest.approx(4 * omega * (0.25 / 4 + 0.75 * 0.8 / 1.4), abs=0.005)
    assert second == pytest.approx(omega, abs=0.005)
    assert table.sum(0).max() <= 2


def test_adaptive_cap_binds_when_the_budget_exceeds_it():
    sched = AdaptiveSchedule(0, 16, 2000, 0.5, 2, chance=0.1)
    table = run_adaptive(sched, 2000, synthetic_agreement(2, 16))
    assert table.sum(0).max() <= 2 and table.sum(0).min() == 2  # every slot used, never more
    assert sched.dropped > 0  # the rest of the budget is dropped, as the fixed table drops draws


def test_adaptive_warmup_and_order():
    sched = AdaptiveSchedule(0, 4, 1000, 0.3, 4, warmup_fraction=0.25)
    table = run_adaptive(sched, 1000, lambda t, layer: 0.5)
    assert not table[:, :250].any() and table[:, 250:].mean() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(RuntimeError):
        sched.competes(5)  # the state is at step 1000: decisions are asked for in order


def test_adaptive_same_reduced_statistics_same_decisions_and_exact_resume():
    """Two schedules (two ranks) fed the same statistics agree; one rebuilt from a JSON
    round trip of the state in the middle continues exactly."""
    kw = dict(seed=9, n_layers=6, total_steps=1200, omega=0.2, a_max=2, chance=2 / 16)
    a, b = AdaptiveSchedule(**kw), AdaptiveSchedule(**kw)
    agreement = synthetic_agreement(3, 6)
    values = {}

    def measured(t, layer):  # one draw per (step, layer), shared by both
        return values.setdefault((t, layer), agreement(t, layer))

    first_a, first_b = run_adaptive(a, 500, measured), run_adaptive(b, 500, measured)
    assert (first_a == first_b).all()
    resumed = AdaptiveSchedule(**kw)
    assert resumed.load_state_dict(json.loads(json.dumps(a.state_dict())), 500) is None
    rest = []
    for t in range(500, 1200):
        ca, cr = a.competes(t), resumed.competes(t)
        assert ca == cr, t
        row = [measured(t, layer) if c else None for layer, c in enumerate(ca)]
        a.update(t, row)
        resumed.update(t, row)
        rest.append(ca)
    assert a.state_dict() == resumed.state_dict()
    # another seed gives another pattern (the phases differ)
    other = run_adaptive(AdaptiveSchedule(**dict(kw, seed=10)), 500, measured)
    assert (other != first_a).any()


def test_adaptive_resume_checks():
    kw = dict(seed=1, n_layers=3, total_steps=100, omega=0.2, a_max=1)
    sched = AdaptiveSchedule(**kw)
    run_adaptive(sched, 40, lambda t, layer: 0.5)
    state = sched.state_dict()
    with pytest.raises(CheckpointError, match="step 40"):
        AdaptiveSchedule(**kw).load_state_dict(state, 41)
    note = AdaptiveSchedule(**dict(kw, omega=0.3)).load_state_dict(state, 40)
    assert "omega 0.2 -> 0.3" in note
    fresh = AdaptiveSchedule(**kw)
    assert "afresh" in fresh.load_state_dict(CompetitionSchedule(1, 3, 100, 0.2, 1).state_dict(), 40)
    assert fresh.next_step == 40 and fresh.competes(40) is not None


def test_fixed_schedule_resume_checks():
    sched = CompetitionSchedule(seed=4, n_layers=4, total_steps=300, omega=0.2, a_max=2)
    state = json.loads(json.dumps(sched.state_dict()))
    assert CompetitionSchedule(**sched.params).load_state_dict(state, 100) is None
    longer = CompetitionSchedule(**dict(sched.params, total_steps=400))
    assert "total_steps 300 -> 400" in longer.load_state_dict(state, 100)
    with pytest.raises(CheckpointError, match="schedule code"):
        CompetitionSchedule(**sched.params).load_state_dict(dict(state, table_sha256="0" * 16), 100)
    # checkpoints written before the checksum existed still resume
    legacy = {k: v for k, v in state.items() if k != "table_sha256"}
    assert CompetitionSchedule(**sched.params).load_state_dict(legacy, 100) is None


def test_build_from_config():
    cfg = CompetitionConfig(mode="adaptive", omega=0.1, a_max=2)
    cfg.adaptive.min_budget = 0.5
    cfg.validate("c")
    sched = build_competition_schedule(0, 4, 100, cfg, chance=0.125)
    assert isinstance(sched, AdaptiveSchedule) and sched.min_budget == 0.5 and sched.chance == 0.125
    assert isinstance(build_competition_schedule(0, 4, 100, cfg, mode="never"), CompetitionSchedule)
    assert not any(build_competition_schedule(0, 4, 100, cfg, mode="never").competes(3))


@pytest.mark.parametrize("key,value,message", [
    ("mode", "sometimes", "c.mode must be one of schedule, adaptive"),
    ("target_temperature", 0.0, "c.target_temperature must be > 0"),
])
def test_competition_config_rejects_bad_values(key, value, message):
    from competesmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        CompetitionConfig(**{key: value}).validate("c")
    cfg = CompetitionConfig()
    cfg.adaptive.ema = 0.0
    with pytest.raises(ConfigError, match=r"c\.adaptive\.ema must be in \(0, 1\]"):
        cfg.validate("c")


def test_resume_check_reads_keys_added_since_the_checkpoint_as_their_defaults():
    """A checkpoint written before competition.adaptive / target_temperature existed resumes under
    the defaults (the old behaviour); a non-default value of a new key is still a method change."""
    from competesmoe.config import Config, to_dict
    from competesmoe.train.resume import check_resume_config

    now = to_dict(Config())
    saved = json.loads(json.dumps(now))
    del saved["model"]["moe"]["competition"]["adaptive"], saved["model"]["moe"]["competition"]["target_temperature"]
    check_resume_config(saved, now, [], print, defaults=to_dict(Config()))
    assert "adaptive" not in saved["model"]["moe"]["competition"]  # the caller's dict is left alone
    sharper = json.loads(json.dumps(now))
    sharper["model"]["moe"]["competition"]["target_temperature"] = 0.5
    with pytest.raises(CheckpointError, match=r"target_temperature \(1.0 -> 0.5\)"):
        check_resume_config(saved, sharper, [], print, defaults=to_dict(Config()))
    with pytest.raises(CheckpointError, match="target_temperature"):  # without defaults: a change
        check_resume_config(saved, now, [], print)
