"""The competition schedule: cap, rate, determinism, resume, warm-up (method doc, section 4)."""
import numpy as np
import pytest

from competesmoe.model.moe.schedule import CompetitionSchedule, build_schedule


def reference_schedule(uniforms, omega, a_max, warm):
    """The rule written step by step over a given table of uniforms [L, steps]."""
    n_layers, steps = uniforms.shape
    marked = [[False] * steps for _ in range(n_layers)]

    def count(t):
        return sum(marked[l][t] for l in range(n_layers))

    for l in range(n_layers):
        for t in range(warm, steps):
            if uniforms[l, t] >= omega or marked[l][t]:
                continue
            if count(t) < a_max:
                marked[l][t] = True
                continue
            candidates = [j for j in range(t - 1, warm - 1, -1) if count(j) < a_max and not marked[l][j]]
            candidates += [j for j in range(t + 1, steps) if count(j) < a_max and not marked[l][j]]
            if candidates:
                marked[l][candidates[0]] = True
    return np.array(marked)


def test_matches_the_rule_written_out():
    seed, n_layers, steps, omega, a_max, warmup = 7, 6, 300, 0.4, 2, 0.1
    warm = int(warmup * steps)
    rng = np.random.default_rng([0x5C4ED, seed])
    uniforms = np.ones((n_layers, steps))
    for l in range(n_layers):
        uniforms[l, warm:] = rng.random(steps - warm)
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
    resumed = CompetitionSchedule(**full.state_dict())
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
