"""Transparent huge pages for torch's CPU allocations: the CLI's choice, made before torch loads.

A base-level module so that the CLI and the benchmarks that start engines the way it does share
one switch without importing the CLI.
"""
from __future__ import annotations

import os
import sys

#: Whether this run of the CLI turned on torch's transparent-huge-page allocations (see :func:`enable_huge_pages`).
HUGE_PAGES_BY_DSR1 = False


def enable_huge_pages() -> bool:
    """Turn on torch's transparent-huge-page allocations (``THP_MEM_ALLOC_ENABLE=1``) for this process.

    torch then aligns every CPU buffer of 2 MiB or more to 2 MiB and asks the kernel for huge pages,
    so weights streamed through the CPU read faster (fewer page-table walks; figures in
    plugins/devices/cpu/README.md). torch reads the variable once, at its first allocation, so this
    only acts before torch is imported: the CLI calls it first thing, a library user sets the variable
    (importing dsr1 changes nothing). A value the user set (``0`` opts out) is kept. Returns whether
    dsr1 set it.
    """
    global HUGE_PAGES_BY_DSR1
    if "torch" not in sys.modules and "THP_MEM_ALLOC_ENABLE" not in os.environ:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        HUGE_PAGES_BY_DSR1 = True
    return HUGE_PAGES_BY_DSR1
