"""Launching training runs: on one device, on one node with torchrun, or on Slurm (`competesmoe-launch`).

The shell scripts in the repository's launch/ folder do the work; `cli` checks a run's layout
before starting it and builds their command lines, and `torchrun` is the torchrun they call.
"""
