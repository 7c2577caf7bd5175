"""The on-disk cache of graph ``adaptive``'s choices, so that a second start skips the trials.

One JSON file per (model, device, config) under ``DSR1_HOME/plans/``; its name is a hash of those
three. Inside, the full key is written again with the torch version: a file whose key does not
match what is running (another torch, another model under a colliding name, a hand-copied file)
or that cannot be parsed is ignored with a one-line warning and rewritten at the next choice.
Writes go to a temporary file in the same directory and replace the cache's own file in one
``os.replace``, so a reader never sees half a file and no other file is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: bumped when the file's layout changes; older files are ignored (with a warning) and rewritten.
FORMAT = 1


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's ``config.json`` and its tensors' names, shapes and dtypes (after
    quantization: an int8 model plans apart from its bf16 original)."""
    config = json.dumps(getattr(model, "config", {}) or {}, sort_keys=True, default=str)
    tensors = [f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in
               (*model.named_parameters(), *model.named_buffers())]
    return _digest(config, *tensors)


def device_name(device: torch.device) -> str:
    """What the plans were measured on: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}:{cpu}:{os.cpu_count()} cores:{torch.get_num_threads()} threads"


class PlanCache:
    """One cache file: :meth:`load` the plans saved for ``key``, :meth:`save` them all.

    :param key: what the plans depend on (``model``, ``device``, ``config`` digests); the torch
        version is added here.
    """

    def __init__(self, root: Path, key: Mapping[str, str]) -> None:
        self.key = {**key, "torch": torch.__version__, "format": str(FORMAT)}
        self.path = root / f"{_digest(key.get('model', ''), key.get('device', ''), key.get('config', ''))}.json"

    def load(self) -> dict[str, dict[str, Any]]:
        """The saved plans by bucket (``"8x256"``), or ``{}`` (no file, or one that does not fit,
        which is warned about)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            return self._ignored(f"cannot be read ({err.strerror or err})")
        try:
            data = json.loads(text)
        except ValueError as err:
            return self._ignored(f"is corrupt ({str(err)[:80]})")
        if not isinstance(data, dict) or not isinstance(data.get("key"), dict) \
                or not isinstance(data.get("plans"), dict):
            return self._ignored("is corrupt (no key or plans)")
        found = data["key"]
        for field, what in (("format", "file format"), ("torch", "torch"), ("model", "model"),
                            ("device", "device"), ("config", "config")):
            if found.get(field) != self.key.get(field):
                return self._ignored(f"was written for another {what} ({str(found.get(field))[:60]!r}, "
                                     f"this is {str(self.key.get(field))[:60]!r})")
        return {str(k): v for k, v in data["plans"].items() if isinstance(v, dict) and isinstance(v.get("plan"), str)}

    def save(self, plans: Mapping[str, Mapping[str, Any]]) -> None:
        """Write every plan, replacing this cache's own file atomically; a write that fails is
        warned about and changes nothing (the next start runs the trials again)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"key": self.key, "plans": dict(plans)}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # our own file, whole or not at all
        except OSError as err:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"graph adaptive: cannot write the plan cache {self.path} ({err.strerror or err}); "
                          "the next start measures the plans again", stacklevel=2)

    def _ignored(self, why: str) -> dict[str, dict[str, Any]]:
        warnings.warn(f"graph adaptive: plan cache {self.path} {why}: ignored, the plans are measured again "
                      "and the file rewritten", stacklevel=3)
        return {}
