"""`competesmoe-launch {slurm,torchrun,local} CONFIG [key=value ...] [options]`.

Checks that the run fits the requested layout, then submits or starts it through the scripts in
the repository's launch/ folder:

    competesmoe-launch slurm configs/smoke.yaml --nodes 2 --gpus-per-node 8 --dry-run
    competesmoe-launch slurm configs/smoke.yaml --gpus-per-node 0 --procs-per-node 2 train.steps=20
    competesmoe-launch slurm configs/smoke.yaml --sweep launch/sweep-seeds.txt
    competesmoe-launch torchrun configs/smoke.yaml --procs-per-node 2
    competesmoe-launch local configs/smoke.yaml

`slurm` writes launch/slurm.sbatch's #SBATCH lines from the options, fixes the config and
overrides in the script and pipes it to sbatch; --dry-run prints that as a shell command instead.
`torchrun` and `local` replace this process with launch/torchrun.sh or launch/local.sh.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from competesmoe.config import Config, load_config
from competesmoe.errors import CompeteSMoEError, cli_main
from competesmoe.parallel.config import check_layout as check_mesh
from competesmoe.parallel.config import micro_batches

LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"
_HEREDOC_END = "COMPETESMOE_BATCH_SCRIPT"


class LaunchError(CompeteSMoEError):
    """A launch option, sweep file or launch script is wrong or missing; the message says which."""


def check_layout(cfg: Config, world: int) -> None:
    """Refuse, before anything is queued, a layout that the trainer would refuse at start."""
    check_mesh(world, cfg.parallel.ep, cfg.model.moe.num_experts)
    micro_batches(cfg.train.global_batch, cfg.train.micro_batch, world)


def check_run_dir(run_dir: str) -> None:
    """The run directory, or the nearest folder that exists above it, must be writable."""
    path = Path(run_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise LaunchError(f"run.dir={run_dir}: {existing} is not a writable directory")


def read_sweep(path: Path) -> list[list[str]]:
    """The overrides of each array task: one whitespace-separated line each, blank and # lines
    skipped; launch/slurm.sbatch selects lines by the same rule."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise LaunchError(f"sweep file {path}: {err.strerror}") from None
    tasks = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tasks:
        raise LaunchError(f"sweep file {path} has no lines of overrides")
    return tasks


def array_indices(spec: str) -> list[int]:
    """The task ids of a Slurm --array spec such as 0-7, 1,3,5, 0-15:2 or 0-7%2."""
    ranges = spec.split("%", 1)[0]
    ids: list[int] = []
    try:
        for part in ranges.split(","):
            bounds, _, step = part.partition(":")
            first, _, last = bounds.partition("-")
            ids.extend(range(int(first), int(last or first) + 1, int(step or 1)))
    except ValueError:
        raise LaunchError(f"--array={spec}: expected task ids like 0-7, 1,3,5, 0-15:2 or 0-7%2") from None
    return ids


def check_run(config: Path, overrides: list[str], world: int) -> Config:
    """Load the run's config as its training processes will, and check it against the layout."""
    cfg = load_config(config, overrides)
    check_layout(cfg, world)
    check_run_dir(cfg.run.dir)
    return cfg


def check_sweep(config: Path, overrides: list[str], world: int, sweep: list[list[str]], tasks: list[int]) -> None:
    """Check the run of each selected task, and that no two of them share a run directory."""
    owners: dict[Path, int] = {}
    for task in tasks:
        if not 0 <= task < len(sweep):
            raise LaunchError(f"array task {task} has no line in the sweep file "
                              f"({len(sweep)} lines: tasks 0-{len(sweep) - 1})")
        try:
            cfg = check_run(config, [*overrides, *sweep[task]], world)
        except CompeteSMoEError as err:
            raise type(err)(f"sweep task {task} ({' '.join(sweep[task])}): {err}") from None
        run_dir = Path(cfg.run.dir).absolute()
        if run_dir in owners:
            raise LaunchError(f"sweep tasks {owners[run_dir]} and {task} both write run.dir={cfg.run.dir}: "
                              "give each line its own run.dir=...")
        owners[run_dir] = task


def sbatch_directives(template: str) -> dict[str, str | None]:
    """The `#SBATCH --name[=value]` lines of a batch script, in order."""
    directives: dict[str, str | None] = {}
    for line in template.splitlines():
        if line.startswith("#SBATCH --"):
            name, _, value = line[len("#SBATCH --"):].strip().partition("=")
            directives[name] = value or None
    return directives


def interpreter_env() -> dict[str, str]:
    """The interpreter the launched processes must use: this one, whose environment has
    competesmoe installed (a bare `python3` from PATH may not)."""
    return {"COMPETESMOE_PYTHON": sys.executable}


def render_batch_script(template: str, directives: dict[str, str | None], env: dict[str, str],
                        argv: list[str]) -> str:
    """`template` with its #SBATCH lines replaced by `directives`, and the job's environment and
    command line fixed in the script, so that the queued script says exactly what will run. The
    environment of this interpreter (its bin/: a virtualenv's or conda's) comes first on PATH."""
    header = ["#!/bin/bash"]
    header += [f"#SBATCH --{name}" + (f"={value}" if value is not None else "")
               for name, value in directives.items()]
    header += ["# Written by competesmoe-launch from launch/slurm.sbatch."]
    header += [f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"']
    header += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    header += ["set -- " + " ".join(shlex.quote(arg) for arg in argv)]
    body = [line for line in template.splitlines()[1:] if not line.startswith("#SBATCH")]
    return "\n".join(header + body) + "\n"


def _launch_script(name: str) -> Path:
    path = LAUNCH_DIR / name
    if not path.is_file():
        raise LaunchError(f"{path} not found: competesmoe-launch runs from a source checkout "
                          "(pip install -e .)")
    return path


def slurm_batch_script(args: argparse.Namespace, config: Path) -> tuple[str, Path]:
    """The checked batch script for the `slurm` options, and the folder of its log."""
    gpus = args.gpus_per_node
    procs = args.procs_per_node or gpus or 1
    if gpus and procs != gpus:
        raise LaunchError(f"--procs-per-node={procs} with --gpus-per-node={gpus}: a GPU run has one "
                          "process per GPU (use --gpus-per-node 0 for CPU processes)")
    if args.array and not args.sweep:
        raise LaunchError("--array needs --sweep FILE: array task i runs with line i of its overrides")
    world = args.nodes * procs
    sweep = read_sweep(args.sweep) if args.sweep else None
    if sweep:
        check_sweep(config, args.overrides, world, sweep,
                    array_indices(args.array) if args.array else list(range(len(sweep))))
    else:
        check_run(config, args.overrides, world)

    template = _launch_script("slurm.sbatch").read_text()
    directives = sbatch_directives(template)
    directives.update({"job-name": f"competesmoe-{config.stem}", "nodes": str(args.nodes),
                       "cpus-per-task": str(args.cpus_per_node or (8 * gpus if gpus else procs))})
    if gpus:
        directives["gpus-per-node"] = str(gpus)
    else:
        directives.pop("gpus-per-node", None)
    for name, value in (("partition", args.partition), ("time", args.time)):
        if value:
            directives[name] = value
    env = {"COMPETESMOE_PROCS_PER_NODE": str(procs), **interpreter_env()}
    if sweep:
        directives["array"] = args.array or f"0-{len(sweep) - 1}"
        directives["output"] = directives["output"].replace("%j", "%A_%a")
        env["COMPETESMOE_SWEEP"] = str(args.sweep.absolute())
    script = render_batch_script(template, directives, env, [str(config), *args.overrides])
    return script, Path(directives["output"]).parent


def _slurm(args: argparse.Namespace, config: Path) -> int:
    script, log_dir = slurm_batch_script(args, config)
    if args.dry_run:
        print(f"sbatch <<'{_HEREDOC_END}'\n{script}{_HEREDOC_END}")
        return 0
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found on PATH: submit from a Slurm login node")
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create it; the job would fail silently
    return subprocess.run(["sbatch"], input=script, text=True).returncode


def _on_this_machine(args: argparse.Namespace, config: Path) -> int:
    env = dict(os.environ, **interpreter_env())
    if args.mode == "torchrun":
        import torch

        procs = args.procs_per_node or torch.cuda.device_count() or 1
        env["COMPETESMOE_PROCS_PER_NODE"] = str(procs)
        script = _launch_script("torchrun.sh")
    else:
        procs = 1
        script = _launch_script("local.sh")
    check_run(config, args.overrides, procs)
    argv = ["bash", str(script), str(config), *args.overrides]
    if args.dry_run:
        prefix = f"COMPETESMOE_PROCS_PER_NODE={procs} " if args.mode == "torchrun" else ""
        prefix += f"COMPETESMOE_PYTHON={shlex.quote(sys.executable)} "
        print(prefix + shlex.join(argv))
        return 0
    sys.stdout.flush()
    os.execvpe("bash", argv, env)


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("config", type=Path, help="YAML config, e.g. configs/smoke.yaml")
    common.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    common.add_argument("--dry-run", action="store_true", help="print the command instead of running it")

    parser = argparse.ArgumentParser(
        prog="competesmoe-launch",
        description="Check a training run's layout, then submit it to Slurm or start it here.")
    modes = parser.add_subparsers(dest="mode", required=True)
    slurm = modes.add_parser("slurm", parents=[common], help="submit a batch job (multi-node, requeued on preemption)")
    slurm.add_argument("--nodes", type=_count(1), default=1, help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=_count(0), default=8,
                       help="GPUs per node, one training process each (default 8); 0 runs CPU processes")
    slurm.add_argument("--procs-per-node", type=_count(1),
                       help="CPU training processes per node with --gpus-per-node 0 (default 1)")
    slurm.add_argument("--cpus-per-node", type=_count(1),
                       help="CPU cores per node (default 8 per GPU, or 1 per CPU process)")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    slurm.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
    slurm.add_argument("--sweep", type=Path,
                       help="one array task per line of this file of overrides (each with its own run.dir)")
    slurm.add_argument("--array", help="the sweep's tasks to run, e.g. 0-3 or 0-15%%4 (default: all lines)")
    torchrun = modes.add_parser("torchrun", parents=[common], help="run on this node, one process per GPU")
    torchrun.add_argument("--procs-per-node", type=_count(1),
                          help="training processes (default: the visible GPUs, or 1 without)")
    modes.add_parser("local", parents=[common], help="run on one device (GPU if present, else CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # argparse leaves overrides that follow an option unparsed; they belong to the overrides.
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest
    config = args.config.absolute()
    return cli_main(lambda: _slurm(args, config) if args.mode == "slurm" else _on_this_machine(args, config))


if __name__ == "__main__":
    sys.exit(main())
