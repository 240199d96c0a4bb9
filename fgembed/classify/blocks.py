"""Row blocks: every forward, score and decode over many rows goes block by block, so a split of
any size (iNat's 100k rows × 10,000 classes) never makes one whole float32 matrix at once."""
from __future__ import annotations

from collections.abc import Iterator

BLOCK_ROWS = 16384  # rows per block: at 10,000 classes a float32 block of logits is 655 MB at most


def blocks(n: int, size: int = BLOCK_ROWS) -> Iterator[slice]:
    """Consecutive slices covering range(n), `size` rows each (the last shorter)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
