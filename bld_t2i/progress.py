"""Progress of long loops, on rank 0: a tqdm bar on a terminal, plain lines in a log.

    with progress(total=n_images, desc="encode", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
            bar.set_postfix(loss=0.31)

    for shard in progress(shards, desc="shards", unit="shard"): ...

Where stderr is a terminal the bar is tqdm's (rate, ETA, postfix). Where it is not (a SLURM
log, a pipe, CI), tqdm's carriage returns would fill the file with bar frames, so a plain
line says the same every `every_s` seconds (default 30, env BLD_PROGRESS_EVERY_S) and once
at the end:

    [encode] 1200/5000 img (24%) 196.3 img/s, elapsed 0:00:06, ETA 0:00:19, loss 0.31

BLD_PROGRESS=bar | plain | off forces a mode. Ranks other than 0 (RANK env) show nothing;
`write` prints a log line on rank 0's stdout in every mode, above the bar.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

MODES = ("bar", "plain", "off")


def _rank() -> int:
    """This process's global rank from the launcher's environment (torchrun's RANK, else srun's)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def progress_mode(stream=None) -> str:
    """bar on a terminal, plain elsewhere, off on ranks other than 0; BLD_PROGRESS overrides."""
    if _rank() != 0:
        return "off"
    forced = os.environ.get("BLD_PROGRESS", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"BLD_PROGRESS={forced!r} is not one of {list(MODES)}")
        return forced
    stream = sys.stderr if stream is None else stream
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "plain"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """A counter with a total, shown as `progress_mode` says. Use `progress()` to make one."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, every_s: float | None = None, mode: str | None = None, stream=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.stream = sys.stderr if stream is None else stream
        self.mode = progress_mode(self.stream) if mode is None else mode
        if self.mode not in MODES:
            raise ValueError(f"progress mode {self.mode!r} is not one of {list(MODES)}")
        self.every_s = float(os.environ.get("BLD_PROGRESS_EVERY_S", 30)) if every_s is None else every_s
        self.postfix: dict[str, object] = {}
        self.start = self.last_line = time.monotonic()
        self._bar = None
        self._closed = False
        self._shown_n = initial  # the count the last plain line showed
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, dynamic_ncols=True,
                             unit_scale=unit not in ("shard", "step"), smoothing=0.1)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this Progress was made without an iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain" and time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def set_postfix(self, **values) -> None:
        """Numbers shown after the rate (floats with 4 significant digits)."""
        self.postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """A line on stdout from rank 0 (in every mode) that does not break the bar."""
        if _rank() != 0:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def line(self) -> str:
        """The plain line for the current count."""
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"[{self.desc}] {count}" if self.desc else count, f"{rate:.1f} {self.unit}/s",
                 f"elapsed {_clock(elapsed)}"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts += [f"{k} {_fmt(v)}" for k, v in self.postfix.items()]
        return ", ".join([parts[0] + " " + parts[1], *parts[2:]])

    def _line(self) -> None:
        self.last_line, self._shown_n = time.monotonic(), self.n
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain" and self.n != self._shown_n:
            self._line()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, every_s: float | None = None, mode: str | None = None, stream=None) -> Progress:
    """A `Progress` over `iterable` (or a counter with `update`), shown as `progress_mode` says."""
    return Progress(iterable, total=total, desc=desc, unit=unit, initial=initial, every_s=every_s, mode=mode,
                    stream=stream)
