"""`competesmoe-data [CONFIG] [key=value ...]`: prepare (or find cached) tokenized data for a config."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from competesmoe.config import load_config
from competesmoe.data.prepare import prepare_data
from competesmoe.errors import cli_main


def _parse(argv: Optional[Sequence[str]]) -> tuple[Optional[str], list[str]]:
    parser = argparse.ArgumentParser(
        prog="competesmoe-data",
        description="Train the tokenizer and write the token shards for a run's data config "
                    "(cached under data.cache_dir; reused while the inputs are unchanged).")
    parser.add_argument("config", nargs="?", help="YAML config file (defaults are used without one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.vocab_size=2048")
    args = parser.parse_args(argv)
    # argparse fills the optional positional first, so an override alone lands in `config`.
    if args.config is not None and "=" in args.config:
        return None, [args.config] + args.overrides
    return args.config, args.overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, overrides = _parse(argv)
    return cli_main(lambda: _prepare(config, overrides))


def _prepare(config: Optional[str], overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    try:
        data = prepare_data(cfg.data, log=lambda line: print(line, file=sys.stderr))
    except KeyboardInterrupt:
        print("error: interrupted; nothing was added to the cache", file=sys.stderr)
        return 130
    meta = data.meta
    print(f"prepared data: {data.directory}")
    print(f"tokenizer: {data.directory / meta['tokenizer']['file']} (vocab {meta['vocab_size']}, "
          f"sha256 {meta['tokenizer']['sha256'][:12]})")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
