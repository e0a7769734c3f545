"""Apply parallelism to a built model, and build the engine that optimises it."""
from __future__ import annotations

from torch import nn

from competesmoe.config import Config
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.engine import TorchEngine


def parallelize(model: nn.Module, mesh: Mesh) -> nn.Module:
    if mesh.ep > 1:
        raise NotImplementedError("expert parallelism")
    return model.to(mesh.device)


def build_engine(model: nn.Module, cfg: Config, mesh: Mesh):
    return TorchEngine(model, cfg.train, mesh)
