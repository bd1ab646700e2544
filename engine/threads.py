"""One setting of torch's CPU thread count, given back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (0: leave the setting as it is), then
    restore the caller's: training and evaluation ask for their own count, and a caller
    (a test session, the node) must not inherit it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
