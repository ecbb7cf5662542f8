"""A thread pool for the byte work of apply and revert (hashing, reading, numpy arithmetic release the GIL)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_threads(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` on up to 4 threads: numpy, hashlib and file reads release the GIL. Each thread
    keeps numpy's BLAS to itself: OpenBLAS's own threads would spin, idle, on the cores ours need (a low-rank
    apply took 30% longer on 2 cores)."""
    items = list(items)
    workers = min(4, os.cpu_count() or 1, len(items))
    if workers < 2:
        return [fn(x) for x in items]
    local = _blas_threads_setter()

    def run(x: T) -> R:
        if local is not None:
            local(1)
        return fn(x)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, items))


@functools.cache
def _blas_threads_setter() -> Callable[[int], int] | None:
    """``openblas_set_num_threads_local`` (OpenBLAS 0.3.27+: the calling thread only) of the OpenBLAS numpy loaded,
    found through /proc/self/maps; None elsewhere (another BLAS, another system), where threads are left as they are."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        for path in paths:
            with contextlib.suppress(OSError, AttributeError):
                setter = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).openblas_set_num_threads_local
                setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
                return setter
    except (OSError, AttributeError):  # no /proc, or no RTLD_NOLOAD
        pass
    return None
