"""torchrun ranks during extraction: which rank this is, the process group, and the pass/fail
exchange that ends each stage.

Why it exists: under torchrun every rank runs the same extraction and the ranks meet only at
collectives. A rank that fails alone (a bug, a bad checkpoint, Ctrl-C) would leave the others
blocked on their next collective until the backend's 30-minute timeout, then dying in gloo's or
NCCL's own traceback. So every stage ends with the ranks exchanging verdicts (`failures_shared`):
the failed rank re-raises its own error, the others print one line naming it. And the engine
destroys the process group it created however the extraction ends (`process_group`), so a rank
that has heard of a failure exits at once rather than tearing the group down at interpreter exit.
The engine's work (shards, stores, models) stays in `extract.py`; this is only the ranks' talk.
A rank killed outright (kill -9, out of memory) exchanges nothing: gloo then fails the others'
collective at once, while NCCL may wait for its own timeout — set `TORCH_NCCL_ASYNC_ERROR_HANDLING`
and a shorter `timeout` in the launcher where that matters.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..errors import FgembedError


def rank_world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Yield (rank, world); under torchrun, join the ranks' process group for the block.

    The group is destroyed on every exit path, but only when this call created it: a caller that
    set up its own group (a torchrun script calling `extract`) keeps it, since it owns it."""
    rank, world = rank_world()
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def failures_shared(stage: str, rank: int, world: int) -> Iterator[None]:
    """Every rank learns whether any rank failed in the block, so none waits on a collective for
    a rank that is gone: the failed rank re-raises its own error (traceback and all), the others
    raise one line naming it. FgembedError is bad input: every rank prints the same line."""
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # Ctrl-C and bugs too: the other ranks are waiting on the gather below
        failure = exc
    verdicts: list[tuple[str, int] | None] = [None] * world
    if world > 1:
        try:
            dist.all_gather_object(verdicts, verdict(failure, rank, stage))
        except Exception as exc:  # a rank died without a word (killed): the collective itself fails
            if failure is None:
                raise FgembedError(f"another rank stopped while {stage} ({' '.join(str(exc).split())[:200]}); "
                                   "see its output", exit_code=1) from None
    if failure is not None:
        raise failure
    for other in verdicts:
        if other is not None:
            raise FgembedError(*other)


def verdict(failure: BaseException | None, rank: int, stage: str) -> tuple[str, int] | None:
    """What the other ranks print about this rank's failure: (one line, exit code)."""
    if failure is None:
        return None
    if isinstance(failure, FgembedError):
        return str(failure), failure.exit_code
    what = " ".join(str(failure).split())[:500] or "no message"
    return f"rank {rank} failed while {stage} ({type(failure).__name__}: {what}); see its output above", 1
