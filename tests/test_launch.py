"""competesmoe-launch and the launch/ scripts: script generation and layout checks (fast), the
requeue-aware torchrun (multiproc), and real jobs on a local Slurm (slurm; start one with
`bash tests/slurm/start.sh` as root)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from competesmoe.config import load_config
from competesmoe.launcher.cli import array_indices, main, read_sweep
from competesmoe.train.trainer import REQUEUE_EXIT_CODE

from runs import (
    MULTIPROCESS_ADAM_EPS,
    assert_follows_reference,
    assert_same_weights,
    final_weights,
    overrides,
    train_losses,
)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
SBATCH_TEMPLATE = ROOT / "launch" / "slurm.sbatch"


def launch(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def batch_script(dry_run_output: str) -> str:
    """The script inside the `sbatch <<'END' ... END` command that --dry-run prints."""
    first, _, rest = dry_run_output.partition("\n")
    end = re.fullmatch(r"sbatch <<'(\w+)'", first).group(1)
    script, _, tail = rest.rpartition(end + "\n")
    assert tail == ""
    return script


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# --- script generation -----------------------------------------------------------------------

def test_slurm_dry_run_prints_the_sbatch_command_with_the_layout(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = launch(capsys, "slurm", SMOKE, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                            "--time", "12:00:00", "train.steps=20", f"run.dir={tmp_path}/run", "--dry-run")
    assert code == 0, err
    script = batch_script(out)
    assert script.startswith("#!/bin/bash\n")
    assert directives(script) == [
        "#SBATCH --job-name=competesmoe-smoke", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --output=logs/%x-%j.out",
        "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
        "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00"]
    assert "export COMPETESMOE_PROCS_PER_NODE=8\n" in script
    # the nodes run this interpreter, with its environment first on PATH, not a python3 from PATH
    assert f"export COMPETESMOE_PYTHON={sys.executable}\n" in script
    assert f'export PATH={Path(sys.executable).parent}:"$PATH"\n' in script
    assert f"set -- {SMOKE} train.steps=20 run.dir={tmp_path}/run\n" in script
    # the body is the template's, minus its own #SBATCH lines
    body = [line for line in SBATCH_TEMPLATE.read_text().splitlines()[1:] if not line.startswith("#SBATCH")]
    assert script.splitlines()[-len(body):] == body
    assert sorted(tmp_path.iterdir()) == []  # a dry run creates neither the run dir nor logs/


def test_generated_script_is_valid_bash(capsys, tmp_path):
    code, out, _ = launch(capsys, "slurm", SMOKE, "--gpus-per-node", "0", "--procs-per-node", "2",
                          f"run.dir={tmp_path}/it's here", "--dry-run")
    assert code == 0
    path = tmp_path / "job.sbatch"
    path.write_text(batch_script(out))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # the quoted override reaches the training command line as one argument
    printed = subprocess.run(["bash", "-c", f"source <(grep '^set -- ' {path}); printf '%s\\n' \"$@\""],
                             capture_output=True, text=True).stdout.splitlines()
    assert printed == [str(SMOKE), f"run.dir={tmp_path}/it's here"]
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


def test_cpu_layout_requests_no_gpu_and_a_core_per_process(capsys, tmp_path):
    code, out, _ = launch(capsys, "slurm", SMOKE, "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "4",
                          f"run.dir={tmp_path}", "--dry-run")
    script = batch_script(out)
    assert code == 0
    assert not any("gpus" in line for line in directives(script))
    assert "#SBATCH --cpus-per-task=4" in directives(script)
    assert "export COMPETESMOE_PROCS_PER_NODE=4\n" in script


def test_sweep_becomes_a_job_array(capsys, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(f"# seeds\nseed=0 run.dir={tmp_path}/s0\n\n  seed=1   run.dir={tmp_path}/s1\n"
                     f"seed=2 run.dir={tmp_path}/s2\n")
    assert read_sweep(sweep) == [["seed=0", f"run.dir={tmp_path}/s0"], ["seed=1", f"run.dir={tmp_path}/s1"],
                                 ["seed=2", f"run.dir={tmp_path}/s2"]]
    code, out, _ = launch(capsys, "slurm", SMOKE, "--gpus-per-node", "4", "--sweep", sweep, "--dry-run")
    script = batch_script(out)
    assert code == 0
    assert "#SBATCH --array=0-2" in directives(script)
    assert "#SBATCH --output=logs/%x-%A_%a.out" in directives(script)
    assert f"export COMPETESMOE_SWEEP={sweep}\n" in script
    code, out, _ = launch(capsys, "slurm", SMOKE, "--gpus-per-node", "4", "--sweep", sweep, "--array", "1-2%1",
                          "--dry-run")
    assert code == 0 and "#SBATCH --array=1-2%1" in directives(batch_script(out))


@pytest.mark.parametrize("spec,ids", [("0-3", [0, 1, 2, 3]), ("1,3,5", [1, 3, 5]), ("0-6:3", [0, 3, 6]),
                                      ("0-7%2", list(range(8))), ("4", [4])])
def test_array_spec(spec, ids):
    assert array_indices(spec) == ids


def test_torchrun_and_local_dry_runs_print_the_script_command(capsys, tmp_path):
    code, out, _ = launch(capsys, "torchrun", SMOKE, "--procs-per-node", "2", f"run.dir={tmp_path}", "--dry-run")
    assert code == 0
    python = f"COMPETESMOE_PYTHON={sys.executable}"
    assert out == f"COMPETESMOE_PROCS_PER_NODE=2 {python} bash {ROOT}/launch/torchrun.sh {SMOKE} run.dir={tmp_path}\n"
    code, out, _ = launch(capsys, "local", SMOKE, f"run.dir={tmp_path}", "train.steps=3", "--dry-run")
    assert code == 0
    assert out == f"{python} bash {ROOT}/launch/local.sh {SMOKE} run.dir={tmp_path} train.steps=3\n"


def bare_env() -> dict:
    """The environment of a user whose PATH does not hold the virtualenv competesmoe is installed
    in (a fresh shell): the launchers must still run the trainer with their own interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "COMPETESMOE_PYTHON")}
    return dict(env, PATH="/usr/bin:/bin", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_local_launch_trains(corpus, tmp_path):
    """The front end replaces itself with launch/local.sh, which runs the trainer."""
    args = overrides(corpus, tmp_path / "run", tmp_path / "cache", **{"train.steps": 2})
    proc = subprocess.run([sys.executable, "-m", "competesmoe.launcher", "local", str(SMOKE), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=bare_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"


@pytest.mark.parametrize("env,message", [
    ({"SLURM_GPUS_ON_NODE": "0"}, "error: no GPU allocated: set COMPETESMOE_PROCS_PER_NODE"),
    ({"SLURM_ARRAY_TASK_ID": "0"}, "error: an array job needs COMPETESMOE_SWEEP=FILE"),
    ({"SLURM_ARRAY_TASK_ID": "2", "COMPETESMOE_SWEEP": "{sweep}"}, "error: {sweep} has no line for array task 2"),
])
def test_batch_script_refuses_a_job_it_cannot_run(env, message, tmp_path):
    """Checked at the start of the job, before srun, for scripts submitted without the front end."""
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# comment\nseed=1\n\nseed=2\n")
    env = {name: value.format(sweep=sweep) for name, value in env.items()}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COMPETESMOE_"))}
    proc = subprocess.run(["bash", str(SBATCH_TEMPLATE), str(SMOKE)], env={**base, **env},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(message.format(sweep=sweep)), proc.stderr


# --- checks before anything runs --------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["train.stepz=3"], "train.stepz"),
    (["--nodes", "2", "--gpus-per-node", "8", "parallel.ep=3"], "parallel.ep=3 does not divide the world size 16"),
    (["--nodes", "3", "--gpus-per-node", "8", "parallel.ep=24"], "model.moe.num_experts=16"),
    (["--nodes", "4", "--gpus-per-node", "8"], "train.global_batch=16 must split into 32 ranks"),
    (["--gpus-per-node", "2", "train.micro_batch=3"], "whole micro-batches of train.micro_batch=3"),
    (["--gpus-per-node", "8", "--procs-per-node", "2"], "one process per GPU"),
    (["--array", "0-3"], "--array needs --sweep"),
])
def test_bad_layout_is_one_clear_line(argv, message, capsys, tmp_path):
    code, out, err = launch(capsys, "slurm", SMOKE, f"run.dir={tmp_path}", *argv, "--dry-run")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_run_dir_must_be_writable(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    for mode in ("slurm", "torchrun", "local"):
        code, _, err = launch(capsys, mode, SMOKE, f"run.dir={tmp_path}/file/run", "--dry-run")
        assert code == 2 and err == f"error: run.dir={tmp_path}/file/run: {tmp_path}/file is not a writable directory\n"


@pytest.mark.parametrize("lines,array,message", [
    ("seed=0 run.dir={d}/a\nseed=1 run.dir={d}/a\n", None, "sweep tasks 0 and 1 both write run.dir="),
    ("seed=0 run.dir={d}/a\n", "0-1", "array task 1 has no line in the sweep file (1 lines: tasks 0-0)"),
    ("seed=0 run.dir={d}/a\nmodel.moe.routr=x run.dir={d}/b\n", None, "sweep task 1 (model.moe.routr=x"),
    ("# nothing\n", None, "has no lines of overrides"),
    ("seed=0 run.dir={d}/a\n", "0-x", "--array=0-x: expected task ids"),
])
def test_bad_sweep_is_one_clear_line(lines, array, message, capsys, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(lines.format(d=tmp_path))
    argv = ["slurm", SMOKE, "--sweep", sweep, "--dry-run"] + (["--array", array] if array else [])
    code, _, err = launch(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("sweep", ["sweep-seeds.txt", "sweep-routers.txt"])
def test_shipped_sweeps_fit_the_smoke_config(sweep, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # their run.dirs are relative
    code, out, err = launch(capsys, "slurm", SMOKE, "--sweep", ROOT / "launch" / sweep, "--dry-run")
    assert code == 0, err
    lines = read_sweep(ROOT / "launch" / sweep)
    assert f"#SBATCH --array=0-{len(lines) - 1}" in directives(batch_script(out))


def test_missing_sweep_file_is_one_clear_line(capsys, tmp_path):
    code, _, err = launch(capsys, "slurm", SMOKE, "--sweep", tmp_path / "nope.txt", "--dry-run")
    assert code == 2 and err == f"error: sweep file {tmp_path}/nope.txt: No such file or directory\n"


def test_bad_option_values_are_refused(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["slurm", str(SMOKE), "--nodes", "0"])
    assert exit.value.code == 2 and "--nodes: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["slurm", str(SMOKE), "--bogus"])
    assert exit.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_submitting_without_slurm_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, _, err = launch(capsys, "slurm", SMOKE, "--gpus-per-node", "0", f"run.dir={tmp_path}/run")
    assert code == 2 and err == "error: sbatch not found on PATH: submit from a Slurm login node\n"


# --- torchrun that keeps the requeue exit code ------------------------------------------------

WORKER = """
import os, pathlib, signal, sys, time
rank = int(os.environ["RANK"])
# one write: the two workers share the pipe
os.write(1, f"rank {rank} ignores SIGUSR1: {signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}\\n".encode())
pathlib.Path(f"ready{rank}").touch()
if rank == 0:  # exits first, once both have reported: its code is the first failure torchrun sees
    while not pathlib.Path("ready1").exists():
        time.sleep(0.05)
    sys.exit(int(sys.argv[1]))
time.sleep(60)  # torchrun stops it after rank 0 fails
"""


@pytest.mark.multiproc
@pytest.mark.parametrize("worker_code,expected", [(REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE), (3, 3), (2, 2), (5, 1)])
def test_torchrun_passes_on_the_requeue_exit_code(worker_code, expected, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.run([sys.executable, "-m", "competesmoe.launcher.torchrun", "--standalone", "--nproc-per-node=2",
                           "worker.py", str(worker_code)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expected, proc.stdout + proc.stderr
    # until the trainer installs its handler, SIGUSR1 from Slurm must not kill a worker
    assert sorted(re.findall(r"rank \d ignores SIGUSR1: (\w+)", proc.stdout)) == ["True", "True"]


@pytest.mark.multiproc
@pytest.mark.slow
def test_torchrun_launch_stops_on_sigterm_with_a_checkpoint_and_resumes(corpus, tmp_path):
    """`competesmoe-launch torchrun` becomes launch/torchrun.sh, then torchrun with 2 CPU processes."""
    run_dir = tmp_path / "run"
    args = overrides(corpus, run_dir, tmp_path / "cache",
                     **{"train.steps": 12, "train.adam_eps": MULTIPROCESS_ADAM_EPS})
    argv = [sys.executable, "-m", "competesmoe.launcher", "torchrun", str(SMOKE), "--procs-per-node", "2", *args]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=bare_env())
    deadline = time.time() + 300
    while len(logged_steps(run_dir)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the same pid: each launcher stage exec's the next
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out  # as the single-process trainer: stopped with a checkpoint
    assert "Traceback" not in out
    stopped = int(re.search(r"stopped by signal at step (\d+)", out).group(1))
    assert f"the run stopped at step {stopped} with a checkpoint" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"

    rerun = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=bare_env())
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in rerun.stdout
    assert logged_steps(run_dir) == list(range(1, 13))
    # losses and final weights of the one-device reference run: nothing was lost or redone
    assert_follows_reference(run_dir, load_config(SMOKE, args), loss_rtol=1e-6, norm_rtol=1e-5, weight_atol=3e-6)


# --- real jobs on a local Slurm ----------------------------------------------------------------

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm() -> int:
    """The number of usable nodes of the running Slurm; skips the test without one."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed (as root: bash tests/slurm/start.sh installs and starts one)")
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    usable = {line.split()[0] for line in sinfo.stdout.splitlines()
              if line.split()[1] in {"idle", "mixed", "allocated", "completing"}}
    if sinfo.returncode != 0 or not usable:
        pytest.skip("no Slurm controller with a usable node answers sinfo "
                    f"({(sinfo.stderr or sinfo.stdout).strip()!r}); "
                    "as root: bash tests/slurm/start.sh")
    return len(usable)


@pytest.fixture(scope="module")
def smoke_cache(slurm, tmp_path_factory) -> Path:
    """The smoke config's data, prepared once here so that the jobs do not tokenize it."""
    from competesmoe.data.prepare import prepare_data

    cache = tmp_path_factory.mktemp("smoke_data")
    prepare_data(load_config(SMOKE, [f"data.cache_dir={cache}"]).data)
    return cache


def job_env() -> dict:
    """The jobs inherit this environment: a bare PATH without the virtualenv, as a user's fresh
    shell. Submitted through competesmoe-launch, the script names the interpreter itself; the
    template submitted by hand is told with COMPETESMOE_PYTHON (launch/slurm.sbatch documents it)."""
    env = bare_env()
    env["PATH"] = f"{env['PATH']}{os.pathsep}{os.path.dirname(shutil.which('sbatch') or '/usr/bin/sbatch')}"
    env.pop("COMPETESMOE_PROCS_PER_NODE", None)
    return env


def submitted_job_id(output: str) -> str:
    match = re.search(r"Submitted batch job (\d+)", output)
    assert match, output
    return match.group(1)


def job_records(job_id: str) -> list[dict]:
    """`scontrol show job` as one dict per job (an array job has one per task)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in out.splitlines()]


def wait_for_job(job_id: str, timeout: float = 900) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = job_records(job_id)
        if all(r["JobState"] in DONE for r in records):
            return records
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish within {timeout} s: {job_records(job_id)}")


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("nodes,procs", [(1, 2), (2, 1)], ids=["1node-x2", "2nodes-x1"])
def test_slurm_job_is_requeued_after_preemption_and_resumes(nodes, procs, slurm, smoke_cache, tmp_path):
    if slurm < nodes:
        pytest.skip(f"needs a Slurm with {nodes} nodes, this one has {slurm} "
                    f"(SLURM_NODES={nodes} bash tests/slurm/start.sh)")
    run_dir, steps = tmp_path / "run", 20
    args = [f"train.steps={steps}", "train.log_every=1", f"run.dir={run_dir}", f"data.cache_dir={smoke_cache}"]
    # one thread per process, so that the uninterrupted run below sums in the same order
    env = dict(job_env(), OMP_NUM_THREADS="1")
    submit = subprocess.run(
        [sys.executable, "-m", "competesmoe.launcher", "slurm", str(SMOKE), "--nodes", str(nodes),
         "--gpus-per-node", "0", "--procs-per-node", str(procs), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = submitted_job_id(submit.stdout)

    deadline = time.time() + 600
    while len(logged_steps(run_dir)) < 3:
        assert time.time() < deadline, f"no training steps after 600 s: {job_records(job)}"
        assert job_records(job)[0]["JobState"] in {"PENDING", "CONFIGURING", "RUNNING"}, job_records(job)
        time.sleep(0.2)
    # what Slurm does --signal=B:USR1@300 before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)

    [record] = wait_for_job(job)
    log = (tmp_path / "logs" / f"competesmoe-smoke-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert record["Restarts"] == "1" and record["NumNodes"] == str(nodes), log
    assert log.count(f"{nodes} node(s) x {procs} process(es)") == 2
    stopped = int(re.search(r"stopped by signal at step (\d+); exiting with code 42", log).group(1))
    assert 3 <= stopped < steps, log
    assert f"requeueing job {job}" in log
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in log
    assert logged_steps(run_dir) == list(range(1, steps + 1))  # each step logged once across both starts
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"
    # The same command never stopped, as 2 processes on this node: 2 data-parallel ranks sum
    # each gradient as a + b on one node or two, so its losses and weights are the job's, bit for bit.
    # (The smoke model's 2048 tokens x top-2 of 16 experts per step turn the rounding differences
    # against the one-device reference into ~1e-3 within 20 steps, too much for a tight check.)
    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "competesmoe.train", str(SMOKE), *args, f"run.dir={tmp_path / 'plain'}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert train_losses(run_dir) == train_losses(tmp_path / "plain")
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "plain"))
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMMIT.json").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_runs_one_sweep_line_per_task(slurm, smoke_cache, tmp_path):
    """launch/slurm.sbatch submitted as it is, on CPU processes, as an array over a sweep file."""
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(f"# one run per seed\nseed=1 run.dir={tmp_path}/seed1\n\nseed=2 run.dir={tmp_path}/seed2\n")
    (tmp_path / "logs").mkdir()
    env = dict(job_env(), COMPETESMOE_PROCS_PER_NODE="1", COMPETESMOE_SWEEP=str(sweep),
               COMPETESMOE_PYTHON=sys.executable)
    submit = subprocess.run(
        ["sbatch", "--gpus-per-node=0", "--cpus-per-task=1", "--array=0-1", str(SBATCH_TEMPLATE), str(SMOKE),
         "train.steps=3", f"data.cache_dir={smoke_cache}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert submit.returncode == 0, submit.stderr
    job = submitted_job_id(submit.stdout)

    records = wait_for_job(job)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in records), records
    for seed in (1, 2):
        run_dir = tmp_path / f"seed{seed}"
        assert logged_steps(run_dir) == [3]
        assert f"\nseed: {seed}\n" in "\n" + (run_dir / "config.yaml").read_text()
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"


@pytest.mark.slurm
def test_slurm_job_that_fails_is_not_requeued(slurm, tmp_path):
    (tmp_path / "logs").mkdir()
    env = dict(job_env(), COMPETESMOE_PROCS_PER_NODE="1", COMPETESMOE_PYTHON=sys.executable)
    submit = subprocess.run(
        ["sbatch", "--gpus-per-node=0", "--cpus-per-task=1", str(SBATCH_TEMPLATE), str(SMOKE), "train.steps=abc",
         f"run.dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert submit.returncode == 0, submit.stderr
    job = submitted_job_id(submit.stdout)
    [record] = wait_for_job(job)
    log = (tmp_path / "logs" / f"competesmoe-{job}.out").read_text()
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", log
    assert "error: command line: bad config key 'train.steps'" in log
    assert "requeueing" not in log
