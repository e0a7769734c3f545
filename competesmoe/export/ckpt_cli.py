"""`competesmoe-ckpt`: look inside a checkpoint, verify it, export a consolidated model.

    competesmoe-ckpt inspect RUN_DIR_OR_CHECKPOINT        step, layout, config, tensors and sizes
    competesmoe-ckpt verify  RUN_DIR_OR_CHECKPOINT        every step directory of a run (or one
                                                          checkpoint): files against their checksums,
                                                          weights finite; exit 1 if any is bad
    competesmoe-ckpt export  RUN_DIR_OR_CHECKPOINT OUT    OUT/model.safetensors + config.yaml +
                                                          tokenizer.model, for evaluation/inference
    competesmoe-ckpt export  RUN_DIR_OR_CHECKPOINT OUT --format hf
                             a Hugging Face directory: AutoModelForCausalLM (trust_remote_code=True)
                             and AutoTokenizer load it (--format hf-native: Mixtral, Llama or
                             GPT-NeoX without remote code, for the configs they compute exactly)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from competesmoe.errors import CompeteSMoEError, cli_main


def _inspect(reader) -> None:
    trainer = reader.trainer
    cfg = trainer["config"]
    print(f"checkpoint: {reader.path}")
    print(f"step: {trainer['step']}   layout at save: world={trainer['layout']['world']}, "
          f"ep={trainer['layout']['ep']}   format: {trainer['format_version']}")
    params = trainer.get("params", {})
    if params:
        print(f"parameters: {params['total'] / 1e6:.1f}M total, {params['active'] / 1e6:.1f}M active")
    m = cfg["model"]
    print(f"model: d={m['d_model']} layers={m['n_layers']} heads={m['n_heads']} router={m['moe']['router']} "
          f"experts={m['moe']['num_experts']} top_k={m['moe']['top_k']} vocab={m['vocab_size']}")
    print(f"samples seen: {trainer['loader']['samples_seen']}   last val loss: {trainer.get('val_loss')}")
    files = [f"{name} ({entry['size'] / 1e6:.2f} MB)" for name, entry in sorted(reader.commit["files"].items())]
    print("files: " + ", ".join(files))
    print(f"{'tensor':60s} {'shape':>20s} {'dtype':>10s} {'pieces':>7s}")
    for name in reader.tensor_names():
        if name.startswith("rng/"):
            continue
        pieces = reader.pieces[name]
        shape = reader.full_shape(name)
        print(f"{name:60s} {str(tuple(shape)):>20s} {reader.dtype(name):>10s} {len(pieces):7d}")


def _verify(path: Path) -> int:
    from competesmoe.train.checkpoint import verify_checkpoints

    report = verify_checkpoints(path)
    width = max(len(name) for name, _, _ in report)
    for name, status, detail in report:
        print(f"{status:11s} {name:{width}s}  {detail}")
    bad = [name for name, status, _ in report if status not in ("ok", "interrupted")]
    if bad:
        print(f"{len(bad)} of {len(report)} step directories are not intact checkpoints: {', '.join(bad)}")
        return 1
    print(f"all {len(report)} step directories are intact checkpoints whose files match the commit record")
    return 0


def _run(args: argparse.Namespace) -> int:
    from competesmoe.train.checkpoint import CheckpointReader, export_consolidated, resolve_checkpoint

    if args.command == "verify":
        return _verify(args.path)
    reader = CheckpointReader(resolve_checkpoint(args.path))
    if args.command == "inspect":
        _inspect(reader)
    else:
        if args.out.exists() and not args.out.is_dir():
            raise CompeteSMoEError(f"export: {args.out} exists and is not a directory; "
                                   "name a new or existing directory")
        if args.format == "consolidated":
            written = export_consolidated(reader, args.out)
            print(f"exported step {reader.trainer['step']} to {', '.join(str(p) for p in written)}")
        else:
            from competesmoe.export.hf import export_checkpoint

            written = export_checkpoint(reader, args.out, args.format)
            print(f"exported step {reader.trainer['step']} ({args.format}) to {args.out}: "
                  f"{', '.join(p.name for p in written)}")
            print(f"load it with transformers.AutoModelForCausalLM.from_pretrained('{args.out}'"
                  f"{', trust_remote_code=True' if args.format == 'hf' else ''}) and AutoTokenizer")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="competesmoe-ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("inspect", "verify", "export"):
        p = sub.add_parser(name)
        p.add_argument("path", type=Path)
        if name == "export":
            p.add_argument("out", type=Path)
            p.add_argument("--format", choices=("consolidated", "hf", "hf-native"), default="consolidated",
                           help="consolidated (default): our own single-file format; hf: Hugging Face "
                                "transformers with our modeling code (any config); hf-native: Mixtral, Llama "
                                "or GPT-NeoX, for the configs they compute exactly (see the README)")
    args = parser.parse_args(argv)
    return cli_main(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
