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

Both ways stream: a rank writes its file one tensor at a time as the engine hands out each
parameter's state (gathered one parameter at a time under ZeRO), and a load reads each
parameter's tensors when the engine asks for them, so neither holds the model's optimizer state.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

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


def _unused_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... if it exists."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


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


def _weights_finite(path: Path) -> bool:
    try:
        return json.loads((path / "trainer.json").read_text()).get("weights_finite") is True
    except (OSError, ValueError):
        return False


class StreamingSafetensors:
    """Writes a safetensors file one tensor at a time, so that no more than one tensor is held for
    it. The header (names, dtypes, shapes, offsets) is written last into space reserved at the start
    for `entries` names of at most `longest_key` characters, padded with spaces, which the format
    allows; any safetensors reader reads the file."""

    DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}

    def __init__(self, path: Path, entries: int, longest_key: int):
        self.path, self.header = Path(path), {}
        # per entry: the quoted key and the dtype, shape (up to 8 dims of 20 digits) and offsets fields
        self.reserved = 64 + entries * (longest_key + 8 * 21 + 2 * 21 + 64)
        self.reserved += -self.reserved % 8
        self.offset = 0

    def __enter__(self) -> "StreamingSafetensors":
        self.file = open(self.path, "wb")
        self.file.seek(8 + self.reserved)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.header:
            raise ValueError(f"tensor {key} written twice")
        cpu = tensor.to("cpu").contiguous()
        raw = cpu.reshape(-1).view(torch.uint8).numpy() if cpu.numel() else b""
        self.file.write(memoryview(raw))
        size = cpu.numel() * cpu.element_size()
        self.header[key] = {"dtype": self.DTYPES[cpu.dtype], "shape": list(cpu.shape),
                            "data_offsets": [self.offset, self.offset + size]}
        self.offset += size

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                text = json.dumps(self.header, separators=(",", ":")).encode()
                if len(text) > self.reserved:
                    raise CheckpointError(f"{self.path}: the safetensors header ({len(text)} bytes) outgrew its "
                                          f"reserved {self.reserved} bytes")
                self.file.seek(0)
                self.file.write(self.reserved.to_bytes(8, "little") + text + b" " * (self.reserved - len(text)))
        finally:
            self.file.close()


class OnDemand(Mapping):
    """A read-only mapping whose values are read from a checkpoint when they are asked for, so
    that whoever walks it holds one value at a time rather than the whole state."""

    def __init__(self, names, read: Callable[[str], Any]):
        self.names, self.read = list(names), read
        self._known = set(self.names)

    def __getitem__(self, name: str):
        if name not in self._known:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class Checkpointer:
    def __init__(self, root: Path, mesh: Mesh, keep_last: int, keep_every: int = 0):
        self.root, self.mesh, self.keep_last, self.keep_every = Path(root), mesh, keep_last, keep_every

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

    def resumable(self, log: Callable[[str], None]) -> Optional["CheckpointReader"]:
        """The newest checkpoint whose files all match their commit record (collective: the ranks
        share the checking). A damaged one is renamed `<name>.corrupt`, kept for inspection, with
        a warning, and the one before it is tried. None for a run without checkpoints; an error
        if there were checkpoints and none is intact."""
        candidates = self.complete()
        for path in reversed(candidates):
            problem = None
            try:
                reader = CheckpointReader(path)
                names = sorted(reader.commit["files"])
                for name in names[self.mesh.rank::self.mesh.world]:
                    reader.file(name)
            except (CheckpointError, OSError, ValueError) as err:
                problem = str(err)
            problems = [p for p in _gather(problem, self.mesh) if p]
            if not problems:
                return reader
            kept = _unused_name(path.with_name(path.name + ".corrupt"))
            log(f"warning: checkpoint {path} is damaged ({problems[0]}); kept as {kept} for inspection, "
                "resuming from the checkpoint before it")
            if self.mesh.is_main:
                os.replace(path, kept)
            self.mesh.barrier()
        if candidates:
            raise CheckpointError(f"none of the {len(candidates)} checkpoints in {self.root} is intact (each was "
                                  "set aside as *.corrupt); start a new run.dir or restore a copy")
        return None

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, engine, trainer_state: dict,
             tokenizer=None) -> Path:
        """Collective: every rank calls it. `tokenizer` is stored in the checkpoint (by rank 0)
        so that a checkpoint alone is enough for evaluation."""
        mesh = self.mesh
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if mesh.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        mesh.barrier()

        rows = expert_rows(model)
        index: dict[str, dict] = {}
        file_name = f"rank{mesh.rank:05d}.safetensors"
        owned = [name for name, _ in model.named_parameters() if _owned(name, rows, mesh)]
        path = tmp / file_name
        # Streamed tensor by tensor: the engine gathers one parameter's state at a time (a
        # collective under ZeRO: every rank walks every parameter, keeping only what it owns),
        # so a save holds one tensor beyond the training state, never the model's optimizer state.
        with StreamingSafetensors(path, entries=3 * len(owned) + 2, longest_key=max(map(len, owned), default=0) + 32) \
                as out:
            def put(kind: str, name: str, tensor: torch.Tensor) -> None:
                start = rows[name][0] if name in rows else None
                key = f"{kind}/{name}" + (f"@{start}" if start is not None else "")
                out.write(key, tensor.detach())
                index[key] = {"tensor": f"{kind}/{name}", "start": start, "file": file_name}

            for name, tensor in engine.param_tensors():
                if _owned(name, rows, mesh):
                    put("model", name, tensor)
                del tensor
            for name, state in engine.state_tensors():
                if _owned(name, rows, mesh):
                    for k in state:
                        put(f"optim.{k}", name, state[k])
                del state  # before the next parameter's moments are gathered
            out.write(f"rng/torch@{mesh.rank}", torch.get_rng_state())
            if torch.cuda.is_available():
                out.write(f"rng/cuda@{mesh.rank}", torch.cuda.get_rng_state())
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        record = {"file": file_name, "size": path.stat().st_size, "checksum": _checksum(path), "index": index}

        records = _gather(record, mesh)
        if mesh.is_main:
            trainer = dict(trainer_state, step=step, format_version=FORMAT_VERSION,
                           layout={"world": mesh.world, "ep": mesh.ep}, optimizer=engine.scalar_state())
            _write_atomic(tmp / "trainer.json", json.dumps(trainer, indent=1))
            files = {r["file"]: {"size": r["size"], "checksum": r["checksum"]} for r in records}
            extra = ["trainer.json"]
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer.model")
                extra.append("tokenizer.model")
            for name in extra:
                files[name] = {"size": (tmp / name).stat().st_size, "checksum": _checksum(tmp / name)}
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
        complete = self.complete()
        # A run writes only finite checkpoints, but a directory may hold older ones: whatever
        # keep_last says, the newest one known to be finite stays.
        finite = [p for p in complete if _weights_finite(p)]
        protected = finite[-1] if finite else None
        for old in complete[:-self.keep_last]:
            step = int(_STEP_DIR.match(old.name).group(1))
            if old != protected and not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)

    # -- load ----------------------------------------------------------------------------------
    def load(self, reader: "CheckpointReader", model: torch.nn.Module, engine) -> dict:
        """Load parameters, optimizer state and this rank's RNG states into the model and
        engine; returns the trainer state. Every file this rank reads is checked against the
        commit record."""
        params = reader.model_tensors(model)
        rows = expert_rows(model)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        with_state = [name for name in shapes if reader.has(f"optim.exp_avg/{name}")]
        # read when the engine asks for a parameter's moments, so it holds one parameter's at a time
        optim_state = OnDemand(with_state, lambda name: {
            k: reader.read(f"optim.{k}/{name}", shapes[name], rows.get(name))
            for k in ("exp_avg", "exp_avg_sq") if reader.has(f"optim.{k}/{name}")})
        engine.load_state(params, optim_state, reader.trainer["optimizer"])
        # RNG states are per rank: a resharded run (another rank count) keeps its fresh ones.
        rng = f"rng/torch@{self.mesh.rank}"
        if reader.has(rng) and reader.trainer["layout"]["world"] == self.mesh.world:
            torch.set_rng_state(reader.read(rng))
            cuda_rng = f"rng/cuda@{self.mesh.rank}"
            if reader.has(cuda_rng) and self.mesh.device.type == "cuda":
                torch.cuda.set_rng_state(reader.read(cuda_rng), self.mesh.device)
        return reader.trainer


class CheckpointReader:
    """Reads tensors of a committed checkpoint by logical name and global expert rows, checking
    each file it opens against the commit record."""

    def __init__(self, path: Path):
        self.path = Path(path)
        commit_file = self.path / "COMMIT.json"
        if not commit_file.is_file():
            raise CheckpointError(f"{self.path} is not a complete checkpoint (no COMMIT.json)")
        self.commit = json.loads(commit_file.read_text())
        self._verified: set[str] = set()
        self._handles: dict[str, Any] = {}
        self.pieces: dict[str, list[dict]] = {}
        for key, entry in self.commit["index"].items():
            self.pieces.setdefault(entry["tensor"], []).append(dict(entry, key=key))
        self.trainer = json.loads(self.file("trainer.json").read_text())

    def file(self, name: str) -> Path:
        """The path of one of the checkpoint's files, checked against the commit record."""
        file = self.path / name
        expected = self.commit["files"].get(name)
        if expected is None or not file.is_file():
            raise CheckpointError(f"checkpoint {self.path}: file {name} is missing")
        if name not in self._verified:
            size = file.stat().st_size
            if size != expected["size"]:
                raise CheckpointError(f"checkpoint {self.path}: {name} has {size} bytes, the commit "
                                      f"record says {expected['size']} (truncated or overwritten)")
            if _checksum(file) != expected["checksum"]:
                raise CheckpointError(f"checkpoint {self.path}: {name} fails its checksum (corrupt)")
            self._verified.add(name)
        return file

    def _slice(self, piece: dict):
        if piece["file"] not in self._handles:
            self._handles[piece["file"]] = safe_open(str(self.file(piece["file"])), "pt")
        return self._handles[piece["file"]].get_slice(piece["key"])

    def full_shape(self, tensor: str) -> tuple[int, ...]:
        """The shape of the whole tensor: expert tensors' pieces stack along the expert dim."""
        shapes = [self._slice(p).get_shape() for p in self.pieces[tensor]]
        return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else tuple(shapes[0])

    def dtype(self, tensor: str) -> str:
        return self._slice(self.pieces[tensor][0]).get_dtype()

    def verify_all(self) -> list[str]:
        """Check every file of the checkpoint against the commit record."""
        for name in sorted(self.commit["files"]):
            self.file(name)
        return sorted(self.commit["files"])

    def has(self, tensor: str) -> bool:
        return tensor in self.pieces

    def tensor_names(self) -> list[str]:
        return sorted(self.pieces)

    def read(self, tensor: str, shape: Optional[torch.Size] = None,
             rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The whole tensor, or global expert rows [start, end) of an expert tensor."""
        found = self.pieces.get(tensor)
        if not found:
            raise CheckpointError(f"checkpoint {self.path} has no tensor '{tensor}': it was written "
                                  "by a different model")
        parts = []
        for piece in sorted(found, key=lambda e: e["start"] or 0):
            sl = self._slice(piece)
            if rows is None or piece["start"] is None:
                parts.append(sl[:])
                continue
            start, n = piece["start"], sl.get_shape()[0]
            lo, hi = max(start, rows[0]), min(start + n, rows[1])
            if lo < hi:
                parts.append(sl[lo - start:hi - start])
        if not parts:
            raise CheckpointError(f"checkpoint {self.path}: no rows {rows} of '{tensor}'")
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        if shape is not None and value.shape != shape:
            raise CheckpointError(f"checkpoint {self.path}: tensor '{tensor}' has shape "
                                  f"{tuple(value.shape)}, the model expects {tuple(shape)} "
                                  "(a checkpoint of a different model shape)")
        return value

    def model_tensors(self, model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
        """The saved value of each of `model`'s parameters (this rank's experts only, under
        expert parallelism), read when asked for; a tensor missing on either side or of another
        shape fails."""
        expected = {n for n, _ in model.named_parameters()}
        saved = {t.split("/", 1)[1] for t in self.pieces if t.startswith("model/")}
        if saved - expected:
            raise CheckpointError(f"checkpoint {self.path} has tensors this model lacks, e.g. "
                                  f"'{sorted(saved - expected)[0]}' (a checkpoint of a different model)")
        rows = expert_rows(model)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        return OnDemand(shapes, lambda name: self.read(f"model/{name}", shapes[name], rows.get(name)))

    def load_model(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, value in self.model_tensors(model).items():
                model.get_parameter(name).copy_(value)


def verify_checkpoints(path: Path) -> list[tuple[str, str, str]]:
    """(name, status, detail) for one checkpoint directory, or for every step directory of a run
    (or its checkpoints/ folder), with or without a commit record. Status: ok, corrupt (a file
    is missing or fails its size or checksum), nonfinite (weights with NaN/inf), incomplete (no
    commit record), interrupted (a save that never finished: step_*.tmp, removed by the next save).
    Directories that training set aside are named step_*.corrupt."""
    path = Path(path)
    if (path / "COMMIT.json").is_file():
        dirs = [path]
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")) if root.is_dir() else []
        if not dirs:
            raise CheckpointError(f"no checkpoint directories (step_*) at {path} (expected a run directory, its "
                                  "checkpoints/ folder, or a step_* directory)")
    report = []
    for d in dirs:
        if d.name.endswith(".tmp"):
            report.append((d.name, "interrupted", "a save that did not finish; not a checkpoint"))
            continue
        if not (d / "COMMIT.json").is_file():
            report.append((d.name, "incomplete", "no COMMIT.json: not a checkpoint"))
            continue
        try:
            reader = CheckpointReader(d)
            files = reader.verify_all()
            bad = [name for name in reader.tensor_names()
                   if name.startswith("model/") and not torch.isfinite(reader.read(name)).all()]
        except (CheckpointError, OSError, ValueError) as err:
            report.append((d.name, "corrupt", str(err)))
            continue
        if bad:
            report.append((d.name, "nonfinite", f"weights with NaN/inf in {len(bad)} tensor(s), e.g. {bad[0]}"))
        else:
            report.append((d.name, "ok", f"step {reader.trainer['step']}: all {len(files)} files match the commit "
                                         "record; weights finite"))
    return report


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, a run directory (its latest checkpoint) or a checkpoints root."""
    path = Path(path)
    if (path / "COMMIT.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = Checkpointer(root, Mesh(world=1, rank=0, ep=1, device=torch.device("cpu")), 1).latest()
        if latest is not None:
            return latest
    raise CheckpointError(f"no complete checkpoint at {path} (expected a run directory, its "
                          "checkpoints/ folder, or a step_* directory with a COMMIT.json)")


def load_for_inference(path: Path, device: str | torch.device = "cpu"):
    """(config, model in eval mode, tokenizer) from a checkpoint or run directory, on one device,
    whatever layout wrote it."""
    from competesmoe.config import from_dict
    from competesmoe.data.tokenizer import Tokenizer
    from competesmoe.model.transformer import Transformer

    reader = CheckpointReader(resolve_checkpoint(path))
    cfg = from_dict(reader.trainer["config"])
    model = Transformer(cfg.model)
    reader.load_model(model)
    tokenizer = Tokenizer.load(reader.file("tokenizer.model"))
    return cfg, model.to(device).eval(), tokenizer


def export_consolidated(reader: CheckpointReader, out: Path) -> list[Path]:
    """One safetensors file with every parameter whole (experts by global id), plus the model's
    config and the tokenizer: what evaluation and inference need, independent of the layout."""
    from competesmoe.config import from_dict, to_yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name.split("/", 1)[1]: reader.read(name).contiguous()
               for name in reader.tensor_names() if name.startswith("model/")}
    cfg = from_dict(reader.trainer["config"])
    files = [out / "model.safetensors", out / "config.yaml", out / "tokenizer.model"]
    save_file(tensors, str(files[0]), metadata={"step": str(reader.trainer["step"]), "format": "competesmoe"})
    files[1].write_text(to_yaml(cfg))
    shutil.copyfile(reader.file("tokenizer.model"), files[2])
    return files
