"""Keep the disk tier's tensors out of memory while a model is read.

A builder collects every tensor of the model in one dict before assigning it, so a model larger
than host memory could never be built. :class:`SpillingState` is that dict for the ``tiered``
pool: a tensor of a unit that the plan puts on disk is written to a file as it arrives and
replaced by a memory map of it. Mapped pages are the page cache's, not the process's: they
count against the resident set only while touched and leave it when the map goes, which is when
:meth:`~dsr1.pool.tiered.TieredPool.place` has packed the unit into its own file.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def spill(t: torch.Tensor, path: Path) -> torch.Tensor:
    """``t`` written to ``path`` and read back as a read-only map of it; ``t`` itself when its
    layout has no plain byte order (neither contiguous nor a transposed contiguous matrix)."""
    flip = t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()  # the ``kn`` layout's (out, in) view
    base = t.t() if flip else t
    if not base.is_contiguous() or base.numel() == 0:
        return t
    with open(path, "wb") as f:
        f.write(base.reshape(-1).view(torch.uint8).numpy().data)
    mapped = torch.from_file(str(path), shared=False, size=base.numel() * base.element_size(), dtype=torch.uint8)
    back = mapped.view(base.dtype).view(base.shape)
    return back.t() if flip else back


class SpillingState(dict[str, torch.Tensor]):
    """A builder's tensor dict that spills the tensors under ``prefixes`` (module paths) to ``directory``."""

    def __init__(self, prefixes: Iterable[str], directory: Path) -> None:
        super().__init__()
        self.prefixes = tuple(p + "." for p in prefixes)
        self.directory = directory

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        if name.startswith(self.prefixes) and t.device.type == "cpu":
            t = spill(t, self.directory / f"{len(self)}.bin")
        super().__setitem__(name, t)
