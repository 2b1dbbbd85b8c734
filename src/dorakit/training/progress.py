"""What a run shows and how it stops: the progress line on stderr, and Ctrl-C / SIGTERM turned into a
stop at the next step boundary (train.py checkpoints there)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Self


class Progress:
    """Step, loss, tokens/s and ETA on stderr: one self-overwriting line on a terminal (at most 4
    updates/s), else a plain line every 10 s, so logs stay readable."""

    def __init__(self, total: int, enabled: bool = True, label: str = "train") -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self.tty = sys.stderr.isatty()
        self.start, self.last = time.perf_counter(), 0.0

    def update(self, step: int, loss: float, tokens_per_s: float, done_in_run: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < (0.25 if self.tty else 10.0) and step < self.total):
            return
        self.last = now
        eta = (now - self.start) / max(1, done_in_run) * (self.total - step)
        line = (f"{self.label} step {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        sys.stderr.write(f"\r{line}  " if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


class StopOnInterrupt:
    """Within the block, Ctrl-C (SIGINT) or SIGTERM (what torchrun and job schedulers send) only sets
    ``requested``, so the loop stops at the next step boundary with consistent state; a second
    Ctrl-C interrupts at once (a repeated SIGTERM does not: launchers forward it to every process)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:  # SIGTERM never aborts: schedulers and torchrun may send it
            raise KeyboardInterrupt                    # to every process more than once; they kill on their own
        if not self.requested:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                             "(Ctrl-C again aborts)\n")
        self.requested = True

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
