"""Where nodes run CPU-heavy work (training, evaluation) without blocking their event loop.

A node's message loop must keep serving MQTT (acknowledgements, keepalive, control
messages) while torch trains, so training runs in worker threads (torch releases the GIL
in its kernels). One pool per process, sized to the cores the fleet may use, so that
eight in-process devices do not time-slice two cores eight ways. torch itself is kept to
one intra-op thread per worker: results then do not depend on how many workers run.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_workers = 2


def configure(workers: int) -> None:
    """Set the number of worker threads (before the first :func:`compute`)."""
    global _pool, _workers
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if _pool is not None and workers != _workers:
        _pool.shutdown(wait=True)
        _pool = None
    _workers = workers


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        torch.set_num_threads(1)
        _pool = ThreadPoolExecutor(max_workers=_workers, thread_name_prefix="emo-compute")
    return _pool


async def compute(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn(*args, **kwargs)`` in the compute pool and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args, **kwargs))
