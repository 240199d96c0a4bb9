"""Writing a run's logits: `logits.zarr/[<level>/]{val,test}` `[seeds, rows, classes]` float16,
one whole chunk per write, plain zarr (other tools read it without fgembed).

Logits are predicted, masked and cast to float16 on the head's device and written by a thread
while the next block is predicted (`write_logits`; figures in benchmarks/README.md, `logits.py`).
The test split is scored from those very float16 blocks as they are written, so a run's metrics
are what every reader of its logits sees, and no run reads its logits back."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import zarr


LOGIT_ROWS = 4096          # rows per logits chunk and per written block
MASKED = float(np.finfo(np.float16).min)  # logit of a class the head cannot know (finite: fusion-safe)
WRITE_AHEAD = 2            # blocks handed to the writer thread before prediction waits for it
FORWARD_ROWS = 1024        # rows per forward and per scored piece: float32 scratch stays ~40 MB at 10,000 classes
LOGIT_COMPRESSORS = None   # no codec: zstd saves ~8% of float16 logits for ~5× the write and ~4× the read time


def create_logits(group: zarr.Group, name: str, seeds: int, rows: int, classes: int) -> zarr.Array:
    """A `[seeds, rows, classes]` float16 logits array of a run: one chunk per seed and
    LOGIT_ROWS rows (every write a whole chunk), plain zarr, no codec beyond the bytes."""
    return group.create_array(name, shape=(seeds, rows, classes), dtype="float16", chunks=(1, LOGIT_ROWS, classes),
                              compressors=LOGIT_COMPRESSORS, config={"write_empty_chunks": True})


def _device(module: torch.nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def write_logits(arrays: Sequence[zarr.Array], modules: Sequence[torch.nn.Module], X: np.ndarray,
                 excluded: Sequence[np.ndarray],
                 on_block: Callable[[int, int, list[np.ndarray]], None] | None = None) -> None:
    """Every seed's logits of the rows `X` into `arrays[j][seed]` (`j`: the modules' outputs —
    one tensor, or one per level), LOGIT_ROWS rows at a time. Each block is forwarded, masked
    (`excluded[j]` columns) and cast to float16 on the modules' device, so the host receives half
    the bytes and makes no float32 copy; a writer thread stores it as one whole chunk (no read,
    no merge) while the next block is predicted. `on_block(seed, start, blocks)` gets the same
    float16 blocks on a thread of its own, in order (scoring what readers will see)."""
    if not modules:
        return
    device = _device(modules[0])
    columns = [torch.as_tensor(np.asarray(e, np.int64), device=device) for e in excluded]
    pending: deque[list[Future]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="fgembed-write") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="fgembed-score") as scorer, torch.no_grad():
        for k, module in enumerate(modules):
            module.eval()
            for start in range(0, len(X), LOGIT_ROWS):
                blocks = _predict_block(module, X[start:start + LOGIT_ROWS], device, columns)
                if len(pending) == WRITE_AHEAD:
                    _wait(pending.popleft())
                jobs = [writer.submit(_write_blocks, arrays, k, start, blocks)]
                if on_block is not None:
                    jobs.append(scorer.submit(on_block, k, start, blocks))
                pending.append(jobs)
        while pending:
            _wait(pending.popleft())


def _predict_block(module: torch.nn.Module, X: np.ndarray, device: torch.device,
                   columns: list[torch.Tensor]) -> list[np.ndarray]:
    """One block's float16 logits per output, forwarded FORWARD_ROWS rows at a time into a
    float16 buffer: the float32 input and logits of a whole block never exist at once (at iNat
    shape that is ~250 MB of a fit's peak memory)."""
    out: list[torch.Tensor] = []
    for i in range(0, len(X), FORWARD_ROWS):
        z = module(torch.as_tensor(X[i:i + FORWARD_ROWS]).to(device).float())
        for j, (piece, masked) in enumerate(zip([z] if isinstance(z, torch.Tensor) else z, columns, strict=True)):
            piece = piece.float()  # the module's own output: masked in place
            if len(masked):
                piece.index_fill_(1, masked, MASKED)
            if i == 0:
                out.append(torch.empty((len(X), piece.shape[1]), dtype=torch.float16, device=device))
            out[j][i:i + len(piece)] = piece
    return [block.cpu().numpy() for block in out]


def _wait(jobs: list[Future]) -> None:
    for job in jobs:
        job.result()  # a failed write or score raises here, in the caller


def _write_blocks(arrays: Sequence[zarr.Array], k: int, start: int, blocks: list[np.ndarray]) -> None:
    for array, block in zip(arrays, blocks):
        # given in the chunk's own shape, zarr writes the block as it is (a [rows, classes] value
        # is first copied into a fresh fill-valued chunk)
        array[k:k + 1, start:start + len(block)] = block[None]


def write_run_logits(group: zarr.Group, modules: Sequence[torch.nn.Module], X: dict[str, np.ndarray],
                     rows: dict[str, np.ndarray], outputs: Sequence[tuple[str, int, np.ndarray]],
                     on_test_block: Callable[[int, int, list[np.ndarray]], None]) -> None:
    """A run's logits: `{val,test}_rows` and, per output `(prefix, classes, excluded)` (one for a
    single-level run, one per level, `<level>/`, for a multi-level run), `<prefix>{val,test}`;
    each test block, as stored, handed to `on_test_block(seed, start, blocks)` (its scoring)."""
    for split in ("val", "test"):
        group.create_array(f"{split}_rows", data=rows[split].astype(np.int64))
        arrays = [create_logits(group, f"{prefix}{split}", len(modules), len(X[split]), classes)
                  for prefix, classes, _ in outputs]
        write_logits(arrays, modules, X[split], [excluded for _, _, excluded in outputs],
                     on_test_block if split == "test" else None)
