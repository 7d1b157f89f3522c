"""Making many phantoms on every core.

Phantom subjects are independent: each depends on its seed alone and is made on one thread. So a
large cohort is made by one worker process per core, and comes out the same as when made one by
one in this process (tested in ``tests/test_brain.py``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator, Sequence

# Below this much work (jobs x work per job; a 64³ brain is 1) the workers' start costs more
# than they save: made here, one by one.
POOL_MIN_WORK = 24.0


def worker_count(n: int, work: float = 1.0) -> int:
    """How many processes make ``n`` subjects of ``work`` each: one per core (env ``GEN3D_THREADS``
    caps the cores used, as it caps torch's threads), or 1 when the job is too small to share."""
    from ..profiles import pick_threads

    return 1 if n * work < POOL_MIN_WORK else max(1, min(pick_threads(), n))


def in_workers(fn: Callable[[Any], Any], jobs: Sequence[Any], *, work: float = 1.0, desc: str = "",
               progress: bool = True) -> Iterator[Any]:
    """``fn(job)`` for every job, in order, with a progress bar: in this process for a small job,
    else in :func:`worker_count` worker processes with one torch thread each (forked on Linux, as
    torch's DataLoader forks its workers; spawned elsewhere). ``fn`` must be a module-level function."""
    from tqdm.auto import tqdm

    jobs = list(jobs)
    workers = worker_count(len(jobs), work)
    bar = dict(total=len(jobs), desc=desc, mininterval=5, disable=not progress)
    if workers == 1:
        yield from tqdm(map(fn, jobs), **bar)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from tqdm(pool.map(fn, jobs, chunksize=2), **bar)
