"""What may change when a run is resumed with a different config.

A resumed run continues the checkpointed one: a change of the model, the method (router,
competition coefficients, schedule), the data, the sequence length, the optimiser or the seed
would make the continuation a different experiment, so it is refused, naming every changed key,
unless the user lists the key (or a prefix of it) in `run.allow_changes`. Changes that do not
alter what the steps compute are always allowed; a longer or shorter `train.steps` is allowed with
a note, since it stretches the learning-rate and competition schedules.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from competesmoe.errors import CheckpointError

# Keys (or prefixes of keys) whose change leaves the computation of every step unchanged.
ALWAYS_ALLOWED = (
    "run",  # run directory, wandb, progress display, allow_changes itself
    "parallel",  # the job's layout: checkpoints reshard (the global batch is unchanged)
    "train.micro_batch",  # accumulation only splits the same batch
    "train.device",
    "train.log_every", "train.eval_every", "train.eval_batches",
    "train.ckpt_every", "train.keep_last", "train.keep_every",
    "train.nonfinite", "train.max_skipped_steps",
    "data.cache_dir",
    "model.moe.backend",  # the same math on another implementation
)
# Keys that cannot change even when allowed: the loader's position and the competition schedule
# are defined by them.
NEVER_ALLOWED = {
    "seed": "the data order and the competition schedule derive from it",
    "train.seq_len": "the data position counts sequences of the checkpointed length",
}
NOTED = {
    "train.steps": "the learning-rate schedule and the competition schedule are those of the new "
                   "length from here on",
}


def _leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _set(tree: dict, dotted: str, value: object) -> None:
    """tree[a][b]... = value for the dotted key a.b...; copies the dicts on the way, not the caller's."""
    head, _, rest = dotted.partition(".")
    if not rest:
        tree[head] = value
        return
    tree[head] = dict(tree.get(head) or {})
    _set(tree[head], rest, value)


def covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def changed_keys(saved: dict, now: dict) -> dict[str, tuple[object, object]]:
    """Dotted key -> (saved value, new value) for every leaf that differs."""
    old, new = dict(_leaves(saved)), dict(_leaves(now))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_resume_config(saved: dict, now: dict, allowed: list[str], log: Callable[[str], None],
                        defaults: Optional[dict] = None) -> None:
    """Refuse (one CheckpointError naming every key) or accept, noting what the user should know.
    A key the checkpoint's config does not have (added to the code since) counts as its value in
    `defaults`, the config of a fresh Config(): new keys default to the behaviour the code had."""
    if defaults is not None:
        old = dict(_leaves(saved))
        saved = dict(saved)
        for key, value in _leaves(defaults):
            if key not in old:
                _set(saved, key, value)
    changes = changed_keys(saved, now)
    for key, why in NEVER_ALLOWED.items():
        if key in changes:
            old, new = changes[key]
            raise CheckpointError(f"run.dir holds a run with {key}={old!r}, this command has {new!r}; it cannot "
                                  f"change on resume ({why}): use another run.dir")
    refused = [k for k in changes if not covered(k, ALWAYS_ALLOWED) and k not in NOTED
               and not covered(k, allowed)]
    if refused:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused)
        raise CheckpointError(
            f"run.dir holds a run with a different model, method, data or optimisation: {listed}. "
            "Use another run.dir, or allow the change with "
            f"run.allow_changes=[{','.join(refused)}]")
    for key, (old, new) in changes.items():
        if key in NOTED:
            log(f"note: {key} changed from {old} to {new}: {NOTED[key]}")
        elif covered(key, allowed) and not covered(key, ALWAYS_ALLOWED):
            log(f"note: {key} changed from {old!r} to {new!r} (allowed by run.allow_changes)")
