"""Progress over a known number of slow steps (prepare's rendering, evaluate's metrics).

``auto`` draws a bar on stderr when it is a terminal and says nothing otherwise (DVC logs, CI and
the one-line summaries stay as they are); ``bar`` always draws it; ``lines`` prints one line per
step on stdout; ``off`` is silent. Training has its own per-round display (pipeline/train.py).
"""
from __future__ import annotations

import sys

MODES = ("auto", "bar", "lines", "off")


class Steps:
    def __init__(self, mode: str, total: int, desc: str):
        self.total, self.desc, self.done = max(int(total), 1), desc, 0
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.lines = mode == "lines"
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def step(self, what: str) -> None:
        """One step finished; ``what`` says which (e.g. ``render violin``)."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        elif self.lines:
            print(f"{self.desc} {min(self.done, self.total)}/{self.total}: {what}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
