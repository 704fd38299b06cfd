"""Run every benchmark and gather their results into one file (`make bench`).

    python bench/run_all.py [--only train data ...] [--timeout 1800]

Each `bench/bench_*.py` runs as its own subprocess, with `--quick` when it declares that
flag (as it is otherwise). The `<name>_<cpu|gpu>.md` files `bench_<name>.py` writes into
bench/results/ during its run are collected into bench/results/ALL_<cpu|gpu>.md under one machine stamp. A benchmark that
fails or times out is a row marked failed with its error; the others still run. The exit
status is 1 when any failed, after the file is written.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, device_suffix, machine_stamp, write_result

BENCH = Path(__file__).resolve().parent


def run_one(script: Path, timeout: float) -> tuple[dict, list[Path], str]:
    """Run one benchmark; returns its summary row, the result files it wrote, and its error text."""
    cmd = [sys.executable, str(script)] + (["--quick"] if '"--quick"' in script.read_text() else [])
    print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    # Its own session, so a timeout reaches the benchmark's whole process group; SIGTERM first,
    # because torchrun starts its workers in sessions of their own and only ends them itself.
    proc = subprocess.Popen(cmd, cwd=BENCH.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        error = "" if proc.returncode == 0 else f"exit {proc.returncode}\n{stderr.strip()[-3000:]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        error = f"timed out after {timeout:.0f} s"
    seconds = time.time() - start
    # bench_<name>.py writes <name>_<cpu|gpu>.md; only a file written during this run is its result.
    name = script.stem.removeprefix("bench_")
    written = [p for p in sorted(RESULTS.glob(f"{name}_*.md")) if p.stat().st_mtime >= start]
    last_line = error.strip().splitlines()[-1] if error else ""
    row = {"benchmark": script.name, "flags": " ".join(cmd[2:]), "status": "failed" if error else "ok",
           "seconds": round(seconds), "results": ", ".join(p.name for p in written), "error": last_line}
    print(f"[run_all]   {row['status']} in {seconds:.0f} s {last_line}", flush=True)
    return row, written, error


def embedded(path: Path) -> str:
    """A result file's text one heading level down, under a heading naming the file."""
    lines = path.read_text().strip().splitlines()
    title = lines[0].lstrip("# ") if lines and lines[0].startswith("# ") else path.stem
    body = ["#" + line if line.startswith("#") else line for line in lines[1:]]
    return "\n".join([f"## {title} (`{path.name}`)", *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=[], help="benchmark names without bench_ and .py (default: all)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = p.parse_args()
    scripts = sorted(BENCH.glob("bench_*.py"))
    names = {s.stem.removeprefix("bench_") for s in scripts}
    if unknown := set(args.only) - names:
        p.error(f"--only: no benchmark {sorted(unknown)}; there are {sorted(names)}")
    scripts = [s for s in scripts if not args.only or s.stem.removeprefix("bench_") in args.only]

    stamp = machine_stamp()  # at the start: the load the benchmarks ran under
    rows, sections, failures = [], [], []
    for script in scripts:
        row, written, error = run_one(script, args.timeout)
        rows.append(row)
        sections += [embedded(path) for path in written]
        if error:
            failures.append(f"### {script.name}\n\n```\n{error}\n```")
    body = "\n\n".join(sections + (["## Failures", *failures] if failures else []))
    path = write_result(f"ALL_{device_suffix()}", "All benchmarks", rows, body, stamp)
    print(f"[run_all] wrote {path}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
