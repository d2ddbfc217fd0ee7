"""Data preparation throughput and memory: the whole `prepare` pipeline against the tokenizer alone.

    .venv/bin/python bench/data_bench.py [--size-mb 1024] [--workers 2] [--tokenizer stdlib-bpe-4096]

1. Writes a jsonl of about --size-mb MB: the Python standard library's files as documents, over and
   over (each copy's documents get a `# copy k` first line), under --dir.
2. The pipeline: `prepare(..., workers=N)` in a child process (so its memory is its own), timed around
   the call; a sampler adds up the RSS and PSS of the child and its workers every 0.2 s.
3. The raw tokenizer: the same tokenizer's `encode_batch_fast` (the call `Tokenizer.encode_batch`
   makes; `encode_batch`, which also computes offsets, is slower) on the same texts in ~1 MB batches,
   with N Rust threads, timing only the calls (reading and JSON parsing are left out).

It prints tokens/s per core of both, by wall time / N and per CPU-second (the latter holds on a machine
others load too), goal: the pipeline >= 80% of raw; and the pipeline's peak memory
(goal < 1 GB, summed over its processes). Results: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

PIPELINE = """
import json, resource, sys, time
from moeforge.train.prepare import prepare
src, tok, out, workers = sys.argv[1:]
def cpu():  # this process and its workers (joined when prepare returns)
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + r.ru_utime + r.ru_stime
t0, c0 = time.perf_counter(), cpu()
meta = prepare([src], tok, out, workers=int(workers), progress=False, log=lambda *a: None)
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu() - c0, "tokens": meta["tokens"],
                  "documents": meta["documents"]}))
"""


def make_jsonl(path: Path, size_mb: int) -> int:
    """Stdlib documents, repeated to `size_mb` MB; the number of documents."""
    from moeforge.train.prepare import documents

    texts = list(documents(None))
    n, written, copy = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb << 20:
            for text in texts:
                line = json.dumps({"text": f"# copy {copy}\n{text}"}, ensure_ascii=False) + "\n"
                written += len(line.encode("utf-8"))
                f.write(line)
                n += 1
                if written >= size_mb << 20:
                    break
            copy += 1
    return n


def tree_memory(pid: int, peak: dict, stop: threading.Event):
    """Peak sums of RSS and PSS over `pid` and its descendants, sampled every 0.2 s."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            rss = pss = 0
            for p in procs:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            continue
        peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
        stop.wait(0.2)


def raw_tokens_per_s(path: Path, spec: str) -> tuple[int, float, float]:
    """Tokens, wall seconds and CPU seconds (all threads) inside `encode_batch_fast`."""
    from moeforge.train.tokenizer import load_tokenizer

    tok = load_tokenizer(spec).tok
    tokens, seconds, cpu, batch, size = 0, 0.0, 0.0, [], 0

    def run():
        nonlocal tokens, seconds, cpu
        t0, c0 = time.perf_counter(), time.process_time()
        encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        tokens += sum(len(e.ids) for e in encodings) + len(batch)  # + one end-of-document id each, as prepared

    with open(path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            size += len(batch[-1])
            if size >= 1 << 20:
                run()
                batch, size = [], 0
    if batch:
        run()
    return tokens, seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default="stdlib-bpe-4096")
    ap.add_argument("--dir", default="/tmp/moeforge_data_bench")
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # the raw side's threads, before its first encode
    from moeforge.train.tokenizer import HFTokenizer, load_tokenizer

    if not isinstance(load_tokenizer(args.tokenizer), HFTokenizer):
        sys.exit(f"--tokenizer {args.tokenizer}: the raw side needs a `tokenizers` tokenizer, not bytes")
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"stdlib_{args.size_mb}mb.jsonl"
    if not src.is_file():
        t0 = time.perf_counter()
        n = make_jsonl(src, args.size_mb)
        print(f"wrote {src}: {src.stat().st_size / 2**20:.0f} MiB, {n:,} documents ({time.perf_counter() - t0:.0f} s)")
    load = os.getloadavg()[0]

    child = subprocess.Popen([sys.executable, "-c", PIPELINE, str(src), args.tokenizer, str(work / "out"),
                              str(args.workers)], stdout=subprocess.PIPE, text=True)
    peak, stop = {"rss": 0, "pss": 0}, threading.Event()
    sampler = threading.Thread(target=tree_memory, args=(child.pid, peak, stop), daemon=True)
    sampler.start()
    out, _ = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode:
        sys.exit(f"prepare failed (exit {child.returncode})")
    pipe = json.loads(out)
    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB, largest process

    tokens, seconds, cpu = raw_tokens_per_s(src, args.tokenizer)
    if tokens != pipe["tokens"]:
        sys.exit(f"token counts differ: raw {tokens:,}, prepare {pipe['tokens']:,}")
    raw, prep = tokens / seconds / args.workers, tokens / pipe["seconds"] / args.workers
    raw_cpu, prep_cpu = tokens / cpu, tokens / pipe["cpu"]
    print(f"input: {src.stat().st_size / 2**20:.0f} MiB jsonl, {pipe['documents']:,} documents, {tokens:,} tokens "
          f"({args.tokenizer}); {os.cpu_count()} cores, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"tokens/s per core   wall / {args.workers}   per CPU-second (robust to other load on the machine)")
    print(f"raw encode_batch_fast, {args.workers} threads   {raw:10,.0f}   {raw_cpu:10,.0f}   "
          f"({seconds:.1f} s, {cpu:.1f} CPU-s)")
    print(f"prepare --workers {args.workers}             {prep:10,.0f}   {prep_cpu:10,.0f}   ({pipe['seconds']:.1f} s, "
          f"{pipe['cpu']:.1f} CPU-s)")
    print(f"prepare / raw                     {prep / raw:10.0%}   {prep_cpu / raw_cpu:10.0%}   (goal >= 80%)")
    print(f"prepare peak memory: {peak['pss'] / 2**20:,.0f} MiB PSS summed over its {args.workers + 1} processes "
          f"(RSS sum {peak['rss'] / 2**20:,.0f} MiB, counting shared pages per process; largest process "
          f"{max_rss:,.0f} MiB) (goal < 1 GiB)")


if __name__ == "__main__":
    main()
