"""What every benchmark shares: the machine stamp and the Markdown result file.

A result is `bench/results/<name>.md`: a title, the machine it ran on, a table, notes.
`<name>` ends in `_cpu` or `_gpu` (`device_suffix`) so results of both kinds sit side by side.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_suffix() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def machine_stamp() -> dict[str, str]:
    """CPU, cores, GPU, library versions, date and load: what a reader needs to trust a number.

    The load average is part of it because the machines these run on may be shared.
    """
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown")
    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "gpu": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "versions": f"torch {torch.__version__}, DeepSpeed {ds}, Python {platform.python_version()}",
        "load average (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def markdown_table(rows: list[dict]) -> str:
    """Rows of dicts -> a Markdown table; the columns are the keys in first-seen order.

    Numbers are right-aligned; a missing or None cell is left blank.
    """
    columns = list(dict.fromkeys(k for row in rows for k in row))
    numeric = {c: all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns}

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if numeric[c] else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, rows: list[dict], notes: str = "", stamp: dict[str, str] | None = None) -> Path:
    """Write `bench/results/<name>.md` (temp file, then rename) and return its path."""
    stamp = stamp or machine_stamp()
    text = "\n".join([
        f"# {title}", "",
        *[f"- {k}: {v}" for k, v in stamp.items()], "",
        markdown_table(rows), "",
        *([notes.strip(), ""] if notes.strip() else []),
    ])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
