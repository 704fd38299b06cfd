"""Progress: a tqdm bar when stderr is a terminal, plain lines every N seconds when it is not."""

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from bld_t2i.progress import Progress, progress, progress_mode

ROOT = Path(__file__).resolve().parents[1]
SHARDS_CMD = [sys.executable, "-m", "bld_t2i.cli.make_shards", "--source", "fashion-mnist", "--limit", "300",
              "--shard-size", "100", "--size", "16"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("BLD_PROGRESS", "RANK", "SLURM_PROCID")}
    return {**env, "BLD_PROGRESS_EVERY_S": "0", **extra}


def _run_on_pty(cmd: list[str], env: dict, timeout: float = 120) -> tuple[int, str]:
    """Run cmd with stdout and stderr on a pseudo-terminal; returns (exit code, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_a_tqdm_bar(tmp_path):
    code, shown = _run_on_pty([*SHARDS_CMD, "--out", str(tmp_path / "s")], _env())
    assert code == 0, shown
    # tqdm redraws in place with carriage returns: "shards: 100%|####| 300/300 [00:00<00:00, 1.2kimg/s]"
    assert re.search(r"shards: +100%\|.*\| 300/300 \[", shown), shown
    assert "\r" in shown
    assert "[shards] 300/300 img" not in shown  # no plain lines on a terminal
    assert "shard-000002.tar: 100 samples" in shown  # the per-shard lines still print, above the bar


def test_a_log_gets_plain_lines_and_no_bar_frames(tmp_path):
    proc = subprocess.run([*SHARDS_CMD, "--out", str(tmp_path / "s")], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "|" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[shards]")]
    # every 0 s: one line per update (one per shard), the last one without an ETA
    assert [ln.split(" img")[0] for ln in lines] == ["[shards] 100/300", "[shards] 200/300", "[shards] 300/300"]
    assert re.fullmatch(r"\[shards\] 300/300 img \(100%\) [\d.]+ img/s, elapsed 0:00:\d\d", lines[-1]), lines[-1]
    assert re.search(r"\(33%\) [\d.]+ img/s, elapsed 0:00:\d\d, ETA 0:00:\d\d$", lines[0]), lines[0]


def test_plain_lines_are_throttled_and_say_rate_eta_and_postfix():
    out = io.StringIO()
    bar = Progress(total=1000, desc="train", unit="samples", every_s=3600, mode="plain", stream=out)
    for _ in range(10):
        bar.update(50)
    assert out.getvalue() == ""  # nothing before every_s has passed
    bar.every_s = 0
    bar.set_postfix(loss=0.123456)
    bar.update(50)
    line = out.getvalue().strip()
    assert re.fullmatch(r"\[train\] 550/1000 samples \(55%\) [\d.]+ samples/s, elapsed 0:00:00, ETA [\d:]+, "
                        r"loss 0\.1235", line), line
    bar.close()
    bar.close()  # closing twice writes nothing more: the count did not change since the last line
    assert out.getvalue().count("\n") == 1


def test_resumed_counters_rate_only_counts_new_work():
    out = io.StringIO()
    bar = Progress(total=100, initial=90, unit="samples", every_s=0, mode="plain", stream=out)
    bar.start -= 10  # ten seconds ago
    bar.update(10)
    assert re.search(r"100/100 samples \(100%\) 1\.0 samples/s", out.getvalue()), out.getvalue()


def test_modes_rank_and_override(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("BLD_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert progress_mode(Tty()) == "bar" and progress_mode(io.StringIO()) == "plain"
    monkeypatch.setenv("BLD_PROGRESS", "off")
    assert progress_mode(Tty()) == "off"
    monkeypatch.setenv("BLD_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="BLD_PROGRESS='fancy' is not one of"):
        progress_mode(Tty())
    monkeypatch.delenv("BLD_PROGRESS")
    monkeypatch.setenv("RANK", "1")  # another rank: nothing, not even its log lines
    out = io.StringIO()
    bar = progress(range(3), every_s=0, stream=out)
    assert bar.mode == "off" and list(bar) == [0, 1, 2] and out.getvalue() == ""
