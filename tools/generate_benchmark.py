"""Generation speed with and without the KV cache (competesmoe.model.generate).

For each prompt length and batch size: tokens/s of generating --new-tokens tokens per prompt
(prefill included) with the KV cache and without it (the whole sequence again every step), and
with the cache the time per new token after the prompt (decode only), which should not grow with
the prompt. The model is a checkpoint (--run) or, by default, the config built with random weights
(timing does not depend on the values; EOS is ignored so that every row makes all its tokens).
Medians over --repeats runs after one warm-up; single process, the threads torch is given.

    python tools/generate_benchmark.py configs/smoke.yaml --prompt-lens 16,128,512 --batch-sizes 1,8 \
        --new-tokens 64 --out benchmarks/results/generate_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from competesmoe.config import load_config
from competesmoe.model.generate import generate
from competesmoe.model.kv_cache import KVCache
from competesmoe.model.transformer import Transformer


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    rest = sorted(times[1:])
    return rest[len(rest) // 2]


@torch.no_grad()
def _decode_only(model: Transformer, prompts: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Seconds per decode step with the cache, the prefill excluded (greedy, fixed-length)."""
    device = prompts.device

    def prefill():
        cache = KVCache(len(model.blocks), prompts.shape[1] + new_tokens)
        token = model(prompts, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        return cache, token

    times = []
    for _ in range(repeats + 1):
        cache, token = prefill()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / new_tokens)
    rest = sorted(times[1:])
    return rest[len(rest) // 2]


def measure(model: Transformer, vocab: int, prompt_len: int, batch: int, new_tokens: int, repeats: int,
            device: torch.device, skip_uncached_over: int) -> dict:
    g = torch.Generator().manual_seed(prompt_len * 1000 + batch)
    prompts = torch.randint(2, vocab, (batch, prompt_len), generator=g)
    rows = prompts.tolist()
    total = batch * new_tokens
    row = {"prompt_len": prompt_len, "batch": batch, "new_tokens": new_tokens}
    cached = _median_time(lambda: generate(model, rows, new_tokens, eos_id=None), repeats, device)
    row["cached_tokens_per_s"] = total / cached
    if prompt_len + new_tokens <= skip_uncached_over:
        uncached = _median_time(lambda: generate(model, rows, new_tokens, eos_id=None, use_cache=False),
                                repeats, device)
        row["uncached_tokens_per_s"] = total / uncached
        row["speedup"] = uncached / cached
    row["decode_ms_per_step"] = 1000 * _decode_only(model, prompts.to(device), new_tokens, repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="model config (YAML), e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--run", help="time this checkpoint or run directory instead of random weights")
    parser.add_argument("--prompt-lens", default="16,128,512")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-uncached-over", type=int, default=4096,
                        help="skip the uncached run when prompt + new tokens exceed this (it is quadratic)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.run:
        from competesmoe.train.checkpoint import load_for_inference

        cfg, model, _ = load_for_inference(Path(args.run), device)
    else:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = cfg.data.vocab_size
        torch.manual_seed(0)
        model = Transformer(cfg.model).to(device).eval()
    header = {"config": args.config, "run": args.run, "device": str(device), "machine": platform.machine(),
              "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "params": model.param_counts(), "router": cfg.model.moe.router}
    print(json.dumps(header))
    print(f"{'prompt':>6} {'batch':>5} {'new':>4} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8} "
          f"{'decode ms/step':>15}")
    rows = []
    for prompt_len in (int(x) for x in args.prompt_lens.split(",")):
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            r = measure(model, cfg.model.vocab_size, prompt_len, batch, args.new_tokens, args.repeats, device,
                        args.skip_uncached_over)
            rows.append(r)
            uncached = (f"{r['uncached_tokens_per_s']:15.1f} {r['speedup']:7.2f}x" if "speedup" in r
                        else f"{'-':>15} {'-':>8}")
            print(f"{prompt_len:6d} {batch:5d} {args.new_tokens:4d} {r['cached_tokens_per_s']:13.1f} {uncached} "
                  f"{r['decode_ms_per_step']:15.2f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**header, "results": rows}, indent=1) + "\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
