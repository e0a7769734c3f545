"""Routing analysis of a run's checkpoints on a fixed set of validation tokens (method doc, section 7).

For every checkpoint, on the same tokens:
  load         fraction of (token, slot) assignments each expert receives, per MoE layer;
  competition  (CompeteSMoE only) a forced competition forward in every MoE layer: agreement
               |T^R intersect T^C| / K between the router's and the competition's top-K, and the
               spread of the neural responses s (mean, std, entropy of softmax(s));
and between consecutive checkpoints the expert change rate, per layer:
  top1         fraction of tokens whose highest-weight expert differs;
  topk         fraction of token-to-expert assignments that differ, 1 - |T_a intersect T_b| / K.
From the run's metrics.jsonl: the agreement measured during training, averaged over the logged
windows in which each layer competed.

The routing is read with forward hooks on each MoE layer's router, which the layer always calls in
eval mode, so the model runs unchanged.
"""
from __future__ import annotations

import contextlib
import json
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from competesmoe.errors import CheckpointError
from competesmoe.eval.perplexity import validation_requests
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.checkpoint import Checkpointer, CheckpointReader, load_for_inference

Log = Callable[[str], None]


# -- measuring ------------------------------------------------------------------------------------
def _keep_indices(store: list, module: nn.Module, inputs, output) -> None:
    store.append(output.indices.detach().cpu())


@contextlib.contextmanager
def recorded_routing(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Inside the block, every router call appends its top-K indices [T, K] to its layer's list."""
    records: list[list[Tensor]] = [[] for _ in model.moe_layers]
    handles = [layer.router.register_forward_hook(partial(_keep_indices, records[i]))
               for i, layer in enumerate(model.moe_layers)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def route(model: nn.Module, batches: Sequence[Tensor]) -> list[Tensor]:
    """Each MoE layer's top-K expert indices [tokens, K] for the tokens of all batches, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with recorded_routing(model) as records:
            for batch in batches:
                model(batch.to(device))
    finally:
        model.train(was_training)
    return [torch.cat(layer) for layer in records]


def change_rate(before: Tensor, after: Tensor) -> dict[str, float]:
    """Expert change rate between two routings [T, K] of the same tokens (indices in decreasing
    weight order, as top-K returns them)."""
    if before.shape != after.shape:
        raise ValueError(f"routings of different shapes {tuple(before.shape)} and {tuple(after.shape)}")
    k = before.shape[1]
    kept = (before[:, :, None] == after[:, None, :]).any(-1).sum(-1).float()
    return {"top1": (before[:, 0] != after[:, 0]).float().mean().item(),
            "topk": (1.0 - kept / k).mean().item()}


def load_fractions(indices: Tensor, num_experts: int) -> list[float]:
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    return (counts / counts.sum().clamp_min(1)).tolist()


@torch.no_grad()
def competition_probe(model: nn.Module, batches: Sequence[Tensor]) -> Optional[dict[str, list[float]]]:
    """Per MoE layer, token-weighted means over the batches of the agreement and s statistics of a
    competition step in every layer (training-mode forward without gradients); None when the router
    has no competition step."""
    if not model.cfg.moe.has_competition:
        return None
    device = next(model.parameters()).device
    n_layers = len(model.moe_layers)
    names = ("agreement", "s_mean", "s_std", "s_entropy")
    sums = {name: [0.0] * n_layers for name in names}
    total = 0
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            stats = model(batch.to(device), compete=[True] * n_layers).moe_stats
            for name in names:
                for i, s in enumerate(stats):
                    sums[name][i] += getattr(s, name).item() * batch.numel()
            total += batch.numel()
    finally:
        model.train(was_training)
    return {name: [v / total for v in values] for name, values in sums.items()}


def training_agreement(metrics_path: Path) -> Optional[dict]:
    """Mean agreement per layer over the logged windows of metrics.jsonl in which the layer
    competed, and the mean number of competing layers per step."""
    if not metrics_path.is_file():
        return None
    per_layer: list[list[float]] = []
    competing: list[float] = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        routing = record.get("routing")
        if not routing:
            continue
        competing.append(record.get("competing_layers", 0.0))
        agreement = routing.get("agreement") or []
        per_layer += [[] for _ in range(len(agreement) - len(per_layer))]
        for i, a in enumerate(agreement):
            if a is not None:
                per_layer[i].append(a)
    return {"agreement": [sum(a) / len(a) if a else None for a in per_layer],
            "competing_layers": sum(competing) / len(competing) if competing else None,
            "logged_windows": len(competing)}


# -- a run's checkpoints -------------------------------------------------------------------------
def checkpoints_of(path: Path) -> list[Path]:
    """A checkpoint directory itself, or every complete checkpoint of a run directory (or of its
    checkpoints/ folder), oldest first."""
    path = Path(path)
    if (path / "COMMIT.json").is_file():
        return [path]
    mesh = Mesh(world=1, rank=0, ep=1, device=torch.device("cpu"))
    for root in (path / "checkpoints", path):
        found = Checkpointer(root, mesh, keep_last=1).complete()
        if found:
            return found
    raise CheckpointError(f"no complete checkpoint at {path} (expected a run directory, its "
                          "checkpoints/ folder, or a step_* directory with a COMMIT.json)")


def eval_batches(cfg, tokenizer, windows: int, batch_size: int, log: Log) -> list[Tensor]:
    """The first `windows` validation windows of the run (inputs only), in batches."""
    requests = validation_requests(cfg, tokenizer.sha256, windows, log)
    inputs = torch.tensor([ids[:-1] for ids, _ in requests], dtype=torch.long)
    return list(inputs.split(batch_size))


def analyze(paths: Sequence[Path], device: str | torch.device = "cpu", windows: int = 64,
            batch_size: int = 16, data_cache: Optional[str] = None, log: Log = print) -> dict:
    """The routing report of the checkpoints under `paths` (see the module docstring); the
    validation tokens come from the first checkpoint's data config, its cache_dir replaced by
    `data_cache` when given."""
    checkpoints = [c for p in paths for c in checkpoints_of(p)]
    batches: Optional[list[Tensor]] = None
    shape = None
    report: dict = {"checkpoints": [], "change_rate": []}
    previous: Optional[tuple[int, list[Tensor]]] = None
    for path in checkpoints:
        step = CheckpointReader(path).trainer["step"]
        cfg, model, tokenizer = load_for_inference(path, device)
        if batches is None:
            if data_cache is not None:
                cfg.data.cache_dir = data_cache
            batches = eval_batches(cfg, tokenizer, windows, batch_size, log)
            report["eval_tokens"] = sum(b.numel() for b in batches)
            shape = (len(model.moe_layers), cfg.model.moe.num_experts, cfg.model.moe.top_k)
        elif (len(model.moe_layers), cfg.model.moe.num_experts, cfg.model.moe.top_k) != shape:
            raise CheckpointError(f"{path} has another MoE shape (layers, experts, top-K) than {checkpoints[0]}")
        log(f"routing: step {step} ({path})")
        routing = route(model, batches)
        loads = [load_fractions(r, cfg.model.moe.num_experts) for r in routing]
        report["checkpoints"].append({
            "step": step, "path": str(path), "load": loads,
            "load_max_over_mean": [max(fractions) * len(fractions) for fractions in loads],
            "competition": competition_probe(model, batches),
        })
        if previous is not None:
            rates = [change_rate(a, b) for a, b in zip(previous[1], routing)]
            report["change_rate"].append({"from": previous[0], "to": step,
                                          "top1": [r["top1"] for r in rates], "topk": [r["topk"] for r in rates]})
        previous = (step, routing)
    run_dirs = {p for p in map(Path, paths) if (p / "metrics.jsonl").is_file()}
    report["training"] = {str(p): training_agreement(p / "metrics.jsonl") for p in sorted(run_dirs)}
    return report


def format_report(report: dict) -> str:
    """The report as a plain-text table: one row per checkpoint and MoE layer."""
    rates = {r["to"]: r for r in report["change_rate"]}
    lines = [f"routing on {report.get('eval_tokens', 0):,} validation tokens",
             f"{'step':>8} {'layer':>5} {'ECR top1':>9} {'ECR topK':>9} {'agreement':>9} {'s_std':>8} "
             f"{'load max/mean':>13}"]

    def cell(values: Optional[list], i: int, fmt: str) -> str:
        return "-" if values is None or values[i] is None else format(values[i], fmt)

    for ckpt in report["checkpoints"]:
        rate = rates.get(ckpt["step"], {})
        comp = ckpt["competition"] or {}
        for i, ratio in enumerate(ckpt["load_max_over_mean"]):
            lines.append(f"{ckpt['step']:>8} {i:>5} {cell(rate.get('top1'), i, '9.3f'):>9} "
                         f"{cell(rate.get('topk'), i, '9.3f'):>9} {cell(comp.get('agreement'), i, '9.3f'):>9} "
                         f"{cell(comp.get('s_std'), i, '8.4f'):>8} {ratio:13.2f}")
    for run, summary in report.get("training", {}).items():
        if summary:
            agreement = ", ".join(cell(summary["agreement"], i, ".3f") for i in range(len(summary["agreement"])))
            competing = cell([summary["competing_layers"]], 0, ".2f")
            lines.append(f"training ({run}): agreement per layer [{agreement}], competing layers per step {competing}")
    return "\n".join(lines)
