"""Sharded, atomic checkpoints that do not depend on the job's layout.

A checkpoint is a directory `<root>/step_<NNNNNNNN>/`:
  rank<R>.safetensors   tensors written by rank R: the parameters and optimizer state it owns,
                        and its RNG state. Dense tensors are written once (by rank 0); expert
                        tensors by the ranks of the first expert-parallel group, each its slice
                        of experts, keyed by the global id of its first expert.
  trainer.json          step, loader and schedule state, config, layout, optimizer scalars.
  COMMIT.json           written last: every file with its size and blake2b checksum, and an
                        index of where each logical tensor's rows are. A directory without it is
                        not a checkpoint.
  <root>/latest         the name of the newest complete checkpoint, replaced atomically.

Saving writes into `step_<N>.tmp`, and only a complete directory is renamed into place, so a
crash or kill during a save leaves the previous checkpoint intact. Loading reads each tensor
from whichever files hold its rows, so a checkpoint written with one data x expert layout loads
into another; a model of another shape fails naming the tensor, a corrupt or missing file fails
naming the file.

We write our own format rather than torch.distributed.checkpoint or DeepSpeed's: the optimizer
state of DeepSpeed's ZeRO is partitioned by the layout of the job that wrote it, while ours is
stored per parameter (full experts by global id), which makes resharding a matter of slicing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from competesmoe.errors import CheckpointError
from competesmoe.parallel.mesh import Mesh

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _gather(obj: Any, mesh: Mesh) -> list:
    if not mesh.distributed:
        return [obj]
    out = [None] * mesh.world
    dist.all_gather_object(out, obj)
    return out


def expert_rows(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Names of expert tensors and the global expert ids [start, end) this rank holds."""
    rows = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "first_expert"):
            for tensor in ("w1", "w2"):
                rows[f"{module_name}.{tensor}"] = (module.first_expert, module.first_expert + module.num_experts)
    return rows


def _owned(name: str, rows: dict, mesh: Mesh) -> bool:
    """Dense tensors are saved by rank 0; each expert slice by its holder in the first
    expert-parallel group (ranks 0..ep-1)."""
    return mesh.rank < mesh.ep if name in rows else mesh.rank == 0


class Checkpointer:
    def __init__(self, root: Path, mesh: Mesh, keep_last: int):
        self.root, self.mesh, self.keep_last = Path(root), mesh, keep_last

    # -- discovery ------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMMIT.json").is_file()]
        return sorted(dirs)

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / "COMMIT.json").is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, engine, trainer_state: dict) -> Path:
        mesh = self.mesh
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if mesh.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        mesh.barrier()

        rows = expert_rows(model)
        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, dict] = {}
        file_name = f"rank{mesh.rank:05d}.safetensors"

        def put(kind: str, name: str, tensor: torch.Tensor) -> None:
            start = rows[name][0] if name in rows else None
            key = f"{kind}/{name}" + (f"@{start}" if start is not None else "")
            tensors[key] = tensor.detach().to("cpu").contiguous()
            index[key] = {"tensor": f"{kind}/{name}", "start": start, "file": file_name}

        for name, param in model.named_parameters():
            if _owned(name, rows, mesh):
                put("model", name, param)
        for name, state in engine.state_tensors().items():
            if _owned(name, rows, mesh):
                for k, v in state.items():
                    put(f"optim.{k}", name, v)
        tensors[f"rng/torch@{mesh.rank}"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors[f"rng/cuda@{mesh.rank}"] = torch.cuda.get_rng_state()
        path = tmp / file_name
        save_file(tensors, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        record = {"file": file_name, "size": path.stat().st_size, "checksum": _checksum(path), "index": index}

        records = _gather(record, mesh)
        if mesh.is_main:
            trainer = dict(trainer_state, step=step, format_version=FORMAT_VERSION,
                           layout={"world": mesh.world, "ep": mesh.ep}, optimizer=engine.scalar_state())
            _write_atomic(tmp / "trainer.json", json.dumps(trainer, indent=1))
            files = {r["file"]: {"size": r["size"], "checksum": r["checksum"]} for r in records}
            files["trainer.json"] = {"size": (tmp / "trainer.json").stat().st_size,
                                     "checksum": _checksum(tmp / "trainer.json")}
            merged_index = {k: v for r in records for k, v in r["index"].items()}
            _write_atomic(tmp / "COMMIT.json", json.dumps({"step": step, "files": files, "index": merged_index}))
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / "latest", final.name)
            self._prune()
        mesh.barrier()
        return final

    def _prune(self) -> None:
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, engine) -> dict:
        """Load parameters and optimizer state into this rank's model and engine; returns the
        trainer state. Every file this rank reads is checked against the commit record."""
        path = Path(path)
        commit_file = path / "COMMIT.json"
        if not commit_file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no COMMIT.json)")
        commit = json.loads(commit_file.read_text())
        verified: set[str] = set()

        def open_file(name: str):
            file = path / name
            expected = commit["files"].get(name)
            if expected is None or not file.is_file():
                raise CheckpointError(f"checkpoint {path}: file {name} is missing")
            if name not in verified:
                size = file.stat().st_size
                if size != expected["size"]:
                    raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, the commit "
                                          f"record says {expected['size']} (truncated or overwritten)")
                if _checksum(file) != expected["checksum"]:
                    raise CheckpointError(f"checkpoint {path}: {name} fails its checksum (corrupt)")
                verified.add(name)
            return file

        trainer = json.loads(open_file("trainer.json").read_text())
        pieces: dict[str, list[dict]] = {}
        for key, entry in commit["index"].items():
            pieces.setdefault(entry["tensor"], []).append(dict(entry, key=key))

        rows = expert_rows(model)
        handles: dict[str, Any] = {}

        def read(tensor_name: str, like: torch.Tensor, name: str) -> torch.Tensor:
            found = pieces.get(tensor_name)
            if not found:
                raise CheckpointError(f"checkpoint {path} has no tensor '{tensor_name}': it was written "
                                      "by a different model")
            parts = []
            want_start, want_end = rows.get(name, (None, None))
            for piece in sorted(found, key=lambda e: e["start"] or 0):
                if piece["file"] not in handles:
                    handles[piece["file"]] = safe_open(str(open_file(piece["file"])), "pt")
                sl = handles[piece["file"]].get_slice(piece["key"])
                if want_start is None:
                    parts.append(sl[:])
                    continue
                start, n = piece["start"], sl.get_shape()[0]
                lo, hi = max(start, want_start), min(start + n, want_end)
                if lo < hi:
                    parts.append(sl[lo - start:hi - start])
            value = torch.cat(parts) if len(parts) > 1 else parts[0]
            if value.shape != like.shape:
                raise CheckpointError(f"checkpoint {path}: tensor '{tensor_name}' has shape "
                                      f"{tuple(value.shape)}, the model expects {tuple(like.shape)} "
                                      "(a checkpoint of a different model shape)")
            return value

        expected_names = {n for n, _ in model.named_parameters()}
        saved_names = {t.split("/", 1)[1] for t in pieces if t.startswith("model/")}
        extra = sorted(saved_names - expected_names)
        if extra:
            raise CheckpointError(f"checkpoint {path} has tensors this model lacks, e.g. '{extra[0]}' "
                                  "(a checkpoint of a different model)")
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(read(f"model/{name}", param, name))
        optim_state: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in model.named_parameters():
            keys = [t for t in (f"optim.exp_avg/{name}", f"optim.exp_avg_sq/{name}") if t in pieces]
            if keys:
                optim_state[name] = {t.split("/", 1)[0][len("optim."):]: read(t, param, name) for t in keys}
        engine.load_state(optim_state, trainer["optimizer"])
        rng = f"rng/torch@{self.mesh.rank}"
        if rng in pieces:
            torch.set_rng_state(read(rng, torch.get_rng_state(), rng))
        return trainer
