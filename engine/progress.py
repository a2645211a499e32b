"""Progress bars for long work (weight loading, offline batches): tqdm, or nothing when disabled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm.auto import tqdm


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, unit: str, enable: bool = True) -> Iterator:
    if not enable:
        yield _NoBar()
        return
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) as bar:
        yield bar
