"""One progress display for long-running jobs (labelling a corpus, distilling
a data set): tqdm when it is importable, else a plain line on stderr at most
every few seconds; nothing when disabled."""
from __future__ import annotations

import sys
import time

PRINT_EVERY_S = 10.0  # the plain line (no tqdm): at most this often


class Progress:
    """``update(n, **postfix)`` after each unit of work, ``close()`` at the end."""

    def __init__(self, enabled: bool, total: int | None, desc: str, unit: str, initial: int = 0):
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self.count = initial
        self.postfix: dict = {}
        self.bar = None
        self.last = time.monotonic()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)

    def line(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        extra = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {self.count}{of} {self.unit}s" + (f", {extra}" if extra else "")

    def update(self, n: int = 1, **postfix) -> None:
        self.count += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        elif time.monotonic() - self.last >= PRINT_EVERY_S:
            self.last = time.monotonic()
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line() + " (done)", file=sys.stderr, flush=True)
