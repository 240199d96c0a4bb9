"""How many threads the CPU forward gets: the cores the decode workers and the writer leave idle,
measured while the job runs.

A fixed `cores − workers` split wastes a core whenever the workers are mostly idle: a ResNet-50
forward takes ~120 ms per image on one core while its worker spends ~4.5 ms decoding it, so
that worker needs 4 % of a core, not a whole one. A fixed `cores` split stalls: OpenMP threads
that outnumber the free cores spin at their barriers (the small models whose feed keeps a
worker busy ran 4× slower that way on two cores), and so do threads on a machine other work
shares. So the split follows where the time goes. Over each window of batches the workers' and
the writer's CPU seconds (measured where they run) over the loop's wall seconds give the cores
they keep busy; the forward is offered the rest in whole threads (a remainder under `SLACK` of a
core counting as free). An offer is only a candidate: it is run for a window, and the thread
count whose measured seconds per image are lower is kept; one that lost is offered again after
`RETRY` windows (twice that after a second loss, and so on), since other work comes and goes
(on a shared two-core machine two threads ran a ResNet-50 at half the speed of one while another
job held a core, and at 1.5× its speed once it had left). It starts from `cores − workers`, where
the forward's own speed is measurable (on every core next to a busy worker it would stall, and
the worker would seem to need nothing), and reads the first batch alone: a forward that should
have more threads gets them after one batch.
"""
from __future__ import annotations

import math
import time

import torch

from ..cpu import available_cores

WINDOW = 2  # batches per reading; the first batch is a reading of its own, from its forward time alone
SLACK = 0.3  # of a core: demand below this fraction does not cost the forward a thread
BETTER = 0.97  # a candidate must be 3 % faster per image to replace what runs (noise is not a reason)
RETRY = 6  # windows after which a count that lost its trial is offered again; doubled at each loss


class ForwardThreads:
    """`torch.set_num_threads` for the CPU forward, from measured demand and measured speed."""

    def __init__(self, workers: int, cores: int | None = None, ceiling: int | None = None) -> None:
        self.cores = cores or available_cores()
        self.ceiling = min(ceiling or torch.get_num_threads(), self.cores)  # OMP_NUM_THREADS is a ceiling
        self.threads = self._clamp(self.cores - workers)
        self.kept = self.threads  # the best measured so far; `threads` may be a candidate on trial
        self.seconds_per_image: dict[int, float] = {}
        self.measured_at: dict[int, int] = {}  # thread count → window it was last measured in
        self.retry: dict[int, int] = {}  # thread count → windows before it is offered again
        self._windows = 0
        self.history: list[tuple[int, float]] = [(self.threads, 0.0)]  # (threads, demand) at each change
        self._other = self._images = self._wall = 0.0
        self._batches = 0
        self._last: float | None = None

    def _clamp(self, threads: float) -> int:
        return max(1, min(self.ceiling, int(threads)))

    def apply(self) -> None:
        torch.set_num_threads(self.threads)

    def batch_done(self, images: int, other_cpu_seconds: float, busy_seconds: float) -> None:
        """After a batch: `other_cpu_seconds` is the workers' and the writer's CPU time for it,
        `busy_seconds` the loop's time on it once it had arrived. The first batch is read at once
        from its busy time (its wait is start-up: the models were building), so a forward that
        should have more threads gets them after one batch, not three; later batches are read
        over wall time, waiting included (a feed that cannot keep up shows as demand)."""
        now = time.perf_counter()
        first = self._last is None
        self._wall += busy_seconds if first else now - self._last
        self._other += other_cpu_seconds
        self._images += images
        self._batches += 1
        self._last = now
        if (first or self._batches >= WINDOW) and self._images and self._wall > 0:
            self._window(self._wall / self._images, self._other / self._wall)
            self._other = self._images = self._wall = 0.0
            self._batches = 0

    def _window(self, per_image: float, demand: float) -> None:
        self._windows += 1
        self.seconds_per_image[self.threads] = per_image
        self.measured_at[self.threads] = self._windows
        if self.threads != self.kept:  # a trial ends: keep whichever ran faster
            if per_image < BETTER * self.seconds_per_image[self.kept]:
                self.kept = self.threads
                self.retry.pop(self.threads, None)
            else:
                self.retry[self.threads] = 2 * self.retry.get(self.threads, RETRY // 2)
            self._switch(self.kept, demand)
            return
        offer = self._clamp(math.floor(self.cores - demand + SLACK))
        wait = self.retry.get(offer, RETRY)
        stale = self._windows - self.measured_at.get(offer, -wait) >= wait
        if offer != self.threads and (stale or self.seconds_per_image[offer] < BETTER * per_image):
            self._switch(offer, demand)  # on trial for one window

    def _switch(self, threads: int, demand: float) -> None:
        if threads != self.threads:
            self.threads = threads
            self.history.append((threads, round(demand, 3)))
            self.apply()
