"""Initial weights, and a model built with only one rank's experts.

Every module that owns weights says how they start in `init_parameters(stream)`, where
`stream(name, expert=None)` gives the torch.Generator to draw the tensor `name` (local to the
module) from, or None for torch's global generator. Building a module draws from the global
generator (what `torch.manual_seed(s); Transformer(cfg)` has always meant); a training run instead
draws each tensor from its own generator, seeded from (seed, the tensor's global name, and for
expert tensors the global expert id), so that

  - expert i starts from the same values whatever the expert-parallel layout, and every rank
    holds the same dense weights, without any rank ever building the experts of another;
  - the model can be built on the meta device, sliced to a rank's experts, then materialised:
    a rank's build needs its own share of the weights plus one tensor, not the whole model.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

Stream = Callable[..., Optional[torch.Generator]]  # stream(name, expert=None)


def global_stream(name: str, expert: Optional[int] = None) -> None:
    """torch's global generator, as nn.init draws by default."""
    return None


def tensor_generator(seed: int, name: str, expert: Optional[int] = None) -> torch.Generator:
    """A CPU generator of its own for one tensor (one expert's slice of it), from the run's seed
    and the tensor's global name: independent of layout, device and construction order."""
    key = f"{seed}/{name}" + ("" if expert is None else f"/expert{expert}")
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1)


def _draw(t: Tensor, generator: Optional[torch.Generator],
          fill: Callable[[Tensor, Optional[torch.Generator]], None]) -> None:
    if t.is_meta:  # built on the meta device: values come later, from init_weights
        return
    with torch.no_grad():
        if generator is None:
            fill(t, None)
        else:  # drawn on the CPU in fp32, so the values do not depend on the device or dtype
            values = torch.empty(t.shape, dtype=torch.float32)
            fill(values, generator)
            t.copy_(values)


def normal_(t: Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    _draw(t, generator, lambda x, g: nn.init.normal_(x, std=std, generator=g))


def orthogonal_(t: Tensor, gain: float, generator: Optional[torch.Generator]) -> None:
    _draw(t, generator, lambda x, g: nn.init.orthogonal_(x, gain=gain, generator=g))


def init_weights(model: nn.Module, seed: int) -> None:
    """(Re)draw every weight of `model` from generators seeded by (seed, global name[, expert id]);
    norms start at one (weight) and zero (bias); non-persistent buffers are recomputed."""
    for prefix, module in model.named_modules():
        own = getattr(module, "init_parameters", None)
        if own is not None:
            own(lambda name, expert=None, _p=prefix: tensor_generator(seed, f"{_p}.{name}" if _p else name, expert))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()
