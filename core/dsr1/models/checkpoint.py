"""Reading checkpoints: tensor by tensor, into their final dtype and device, with no second copy of the model.

* :func:`read_safetensors_header` indexes a safetensors file from its header alone; a truncated or corrupt
  file is one line naming it.
* :class:`CheckpointReader` indexes ``model.safetensors`` (or shards + index json, or an opted-in pickle
  checkpoint) without reading tensor data, validates it, then reads one tensor at a time, refusing NaN/Inf
  unless allowed.
* :func:`block_fp8_config` recognises DeepSeek's block-scaled fp8 checkpoints
  (``quantization_config.quant_method: fp8``); the reader dequantizes their weights as read and hides the
  ``*.weight_scale_inv`` companions (the block math is :mod:`dsr1.models.fp8_blocks`).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from dsr1 import progress
from dsr1.errors import Dsr1Error
from dsr1.input_files import is_regular, list_dir, open_regular, probe, read_text
from dsr1.models import fp8_blocks
from dsr1.models.common import Dsr1Model

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# --- block-scaled fp8 checkpoints (DeepSeek's) ----------------------------------------------------

#: ``quantization_config.quant_method`` values dsr1 loads: block fp8 here, ``dsr1`` in
#: :mod:`dsr1.quantization.checkpoint`.
QUANT_METHODS = ("fp8", "dsr1")
#: companion of a block-fp8 weight ``X.weight``: ``X.weight_scale_inv``.
SCALE_SUFFIX = "_scale_inv"


def block_fp8_config(hf: Mapping[str, Any]) -> tuple[int, int] | None:
    """The ``weight_block_size`` of a block-fp8 checkpoint's ``config.json``, validated; ``None`` for a
    plain one (no ``quantization_config``) or a ``dsr1 quantize`` dir. One-line errors name the field."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise Dsr1Error(f"config.json quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "dsr1":
        return None
    if method not in QUANT_METHODS:
        raise Dsr1Error(f"config.json quantization_config.quant_method {method!r} is not supported; use 'fp8' "
                        f"(block-scaled e4m3, DeepSeek's) or 'dsr1' (written by `dsr1 quantize`)")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise Dsr1Error(f"config.json quantization_config.fmt {fmt!r} is not supported; block fp8 supports 'e4m3'")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise Dsr1Error(f"config.json quantization_config.activation_scheme {scheme!r} is not supported; block fp8 "
                        f"supports 'dynamic'")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise Dsr1Error(f"config.json quantization_config.weight_block_size must be two positive ints "
                        f"[rows, columns] (DeepSeek's is [128, 128]), got {block!r}")
    return int(block[0]), int(block[1])


def _dir_block_fp8(model_dir: Path) -> tuple[int, int] | None:
    """:func:`block_fp8_config` of the ``config.json`` beside the weights (none there: a plain checkpoint)."""
    path = model_dir / "config.json"
    if probe(path, "model file") is None:
        return None
    try:
        hf = json.loads(read_text(path, "model file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Dsr1Error(f"{path} is not valid JSON: {err}") from None
    return block_fp8_config(hf) if isinstance(hf, dict) else None


# --- reading checkpoints -----------------------------------------------------------------------


class _Entry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def read_safetensors_header(file: Path) -> dict[str, _Entry]:
    """Tensor name → where its bytes lie in ``file``, from the safetensors header; a truncated or corrupt
    header is one line naming the file."""
    with open_regular(file, "weights file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise Dsr1Error(f"safetensors file {str(file)!r} is truncated or corrupt ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise Dsr1Error(f"safetensors file {str(file)!r} is truncated or corrupt (header of {n} bytes, "
                            f"file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Dsr1Error(f"safetensors file {str(file)!r} is corrupt (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise Dsr1Error(f"safetensors file {str(file)!r} is corrupt (header is not a JSON object)")
    base = 8 + n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Dsr1Error(f"safetensors file {str(file)!r} is corrupt (bad entry for tensor {name!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise Dsr1Error(f"safetensors file {str(file)!r} is corrupt (tensor {name!r} has inconsistent offsets)")
        if base + end > size:
            raise Dsr1Error(
                f"safetensors file {str(file)!r} is truncated: tensor {name!r} ends at byte {base + end}, "
                f"the file has {size}"
            )
        entries[name] = _Entry(file, dtype, shape, base + begin, base + end)
    return entries


def _nonfinite(t: torch.Tensor) -> tuple[int, int] | None:
    """``(NaN count, Inf count)`` of a floating-point tensor that holds any, else ``None``."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.float16)  # exact; torch has no isfinite for float8
    if bool(torch.isfinite(t).all()):
        return None
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


class CheckpointReader:
    """The tensors of one model directory, indexed without reading their data.

    A block-fp8 checkpoint (:func:`block_fp8_config` of the ``config.json`` beside the weights)
    reads like a plain one: ``names()`` hides the ``*.weight_scale_inv`` companions and ``read``
    dequantizes each e4m3 weight with its block scales; :meth:`read_block_fp8` gives the stored pair.
    """

    def __init__(self, model_dir: Path, allow_pickle: bool = False, allow_nonfinite: bool = False) -> None:
        self.model_dir = model_dir
        self.allow_nonfinite = allow_nonfinite
        self.entries: dict[str, _Entry] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._files: dict[Path, BinaryIO] = {}
        #: ``weight_block_size`` of a block-fp8 checkpoint, else ``None``.
        self.block: tuple[int, int] | None = _dir_block_fp8(model_dir)
        #: block-fp8 weight name → the name of its scales.
        self._scales: dict[str, str] = {}
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        # is_regular raises for a FIFO/directory/loop in place of a weights file instead of skipping it
        if is_regular(index, "weights index"):
            files = self._index_files(index)
        elif is_regular(single, "weights file"):
            files = [single]
        else:
            listing = [n for n in list_dir(model_dir, "model directory") if not n.startswith(".")]
            files = [model_dir / n for n in listing if n.endswith(".safetensors")]
        if files:
            for file in files:
                self.entries.update(read_safetensors_header(file))
            self._index_blocks()
            return
        pickles = [model_dir / n for n in listing if n.endswith((".bin", ".pt", ".pth"))]
        for file in pickles:
            is_regular(file, "pickle checkpoint")  # torch.load would block on a FIFO
        if not pickles:
            raise Dsr1Error(f"model directory {str(model_dir)!r} has no model.safetensors (nor sharded *.safetensors)")
        if not allow_pickle:
            raise Dsr1Error(
                f"{pickles[0].name} in {str(model_dir)!r} is a pickle checkpoint, which can run code when loaded; "
                f"convert it to safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)"
            )
        for file in pickles:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
                raise Dsr1Error(f"cannot load pickle checkpoint {str(file)!r}: {type(err).__name__}: {err}") from None
            if not isinstance(state, Mapping):
                raise Dsr1Error(f"pickle checkpoint {str(file)!r} does not hold a state dict")
            self._pickled.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        self._index_blocks()

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` is stored in (before any dequantization :meth:`read` does)."""
        return self._pickled[name].dtype if name in self._pickled else self.entries[name].dtype

    def _index_blocks(self) -> None:
        """Pair every e4m3 weight of a block-fp8 checkpoint with its scales, checking both (one-line errors)."""
        if self.block is None:
            return
        raw = set(self.entries) | set(self._pickled)
        where = f"block-fp8 checkpoint in {str(self.model_dir)!r}"
        for name in sorted(raw):
            if name.endswith(SCALE_SUFFIX):
                weight = name.removesuffix(SCALE_SUFFIX)
                if weight not in raw:
                    raise Dsr1Error(f"{where} has scales {name!r} but no tensor {weight!r}")
                if self.stored_dtype(weight) != torch.float8_e4m3fn:
                    raise Dsr1Error(f"{where} has scales {name!r}, but {weight!r} is stored in "
                                    f"{str(self.stored_dtype(weight)).removeprefix('torch.')}, not float8_e4m3fn")
                continue
            if self.stored_dtype(name) != torch.float8_e4m3fn:
                continue
            scale, shape = name + SCALE_SUFFIX, self.shape(name)
            if scale not in raw:
                raise Dsr1Error(f"{where}: float8 tensor {name!r} has no {scale!r} (its block scales)")
            if len(shape) != 2:
                raise Dsr1Error(f"{where}: float8 tensor {name!r} has shape {shape}; block scales fit (out, in) "
                                f"weights only")
            want, got = fp8_blocks.scale_shape(shape, self.block), tuple(self.shape(scale))
            if got != want:
                raise Dsr1Error(f"{where}: {scale!r} has shape {got}, but weight {name!r} {shape} in blocks of "
                                f"{list(self.block)} needs {want}")
            if not self.stored_dtype(scale).is_floating_point:
                raise Dsr1Error(f"{where}: {scale!r} is {self.stored_dtype(scale)}, not a float tensor")
            self._scales[name] = scale

    def _index_files(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(read_text(index, "weights index"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise Dsr1Error(f"{str(index)!r} is corrupt (no weight_map)") from None
        # a shard is a file of this directory: an index must not point the reader elsewhere
        odd = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")]
        if odd or not shards:
            raise Dsr1Error(f"{str(index)!r} is corrupt (weight_map must name shard files of its directory, "
                            f"got {odd[0] if odd else 'none'!r})")
        files = [self.model_dir / s for s in shards]
        missing = [f.name for f in files if not is_regular(f, "weights file")]
        if missing:
            raise Dsr1Error(f"{index.name} names shard(s) that are missing: {', '.join(missing)}")
        return files

    def names(self) -> set[str]:
        """The tensors a model builder matches (block-fp8 scales hidden: they belong to their weight)."""
        return (set(self.entries) | set(self._pickled)) - set(self._scales.values())

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return self.entries[name].shape

    def float_dtype(self) -> torch.dtype | None:
        """The dtype most of the checkpoint's floating-point bytes are stored in."""
        weight: dict[torch.dtype, int] = {}
        quantized = set(self._scales) | set(self._scales.values())  # block fp8: the rest says the compute dtype
        for name, e in self.entries.items():
            if e.dtype.is_floating_point and name not in quantized:
                weight[e.dtype] = weight.get(e.dtype, 0) + e.end - e.begin
        for name, t in self._pickled.items():
            if t.is_floating_point() and name not in quantized:
                weight[t.dtype] = weight.get(t.dtype, 0) + t.numel() * t.element_size()
        return max(weight, key=lambda d: weight[d]) if weight else None

    def _stored(self, name: str) -> torch.Tensor:
        """One tensor as stored, on the CPU."""
        if name in self._pickled:
            return self._pickled.pop(name)
        e = self.entries[name]
        t = torch.empty(e.shape, dtype=e.dtype)
        f = self._files.get(e.file)
        if f is None:
            f = self._files[e.file] = open_regular(e.file, "weights file")
        f.seek(e.begin)
        if e.end > e.begin:
            buf = t.reshape(-1).view(torch.uint8).numpy()
            got = f.readinto(buf)  # type: ignore[attr-defined]  # straight into the tensor's memory
            if got != e.end - e.begin:
                raise Dsr1Error(f"safetensors file {str(e.file)!r} is truncated while reading {name!r}")
        return t

    def _advance(self, nbytes: int) -> None:
        progress.advance(nbytes, total=lambda: sum(e.end - e.begin for e in self.entries.values()))

    def read_block_fp8(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A block-fp8 weight as stored: e4m3 ``(out, in)`` and its fp32 scales ``(ceil(out / bo), ceil(in / bi))``
        (``self.block``), on ``device``; ``None`` for a tensor stored plain."""
        scale = self._scales.get(name)
        if scale is None:
            return None
        q, s = self._stored(name), self._stored(scale).float()
        if not self.allow_nonfinite:
            for n, t in ((name, q), (scale, s)):
                if _nonfinite(t) is not None:
                    self._refuse_nonfinite(n, t, t)
        self._advance(q.nbytes + s.nbytes)
        return q.to(device), s.to(device)

    def read(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """One tensor, floating-point ones cast to ``dtype``, on ``device``.

        A block-fp8 weight is dequantized on ``device`` (``dtype=None``: fp32, where its products are exact).
        """
        pair = self.read_block_fp8(name, device)
        if pair is not None:
            assert self.block is not None  # _scales is filled only for a block-fp8 checkpoint
            t = fp8_blocks.dequantize(*pair, self.block, dtype or torch.float32)
            if not self.allow_nonfinite and _nonfinite(t) is not None:  # finite as stored: the cast overflowed
                self._refuse_nonfinite(name, pair[0], t)
            return t
        return self._place(name, self._stored(name), dtype, device)

    def _place(self, name: str, stored: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """``stored`` as read, in ``dtype`` on ``device``, checked finite and counted as read."""
        t = stored
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        t = t.to(device) if t.device != device else t
        # checked as placed: one pass, on the accelerator when there is one; it also catches a cast that overflows
        if not self.allow_nonfinite and _nonfinite(t) is not None:
            self._refuse_nonfinite(name, stored, t)
        self._advance(stored.nbytes)
        return t

    def read_slice(self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype | None,
                   device: torch.device) -> torch.Tensor:
        """``read(name)[start:stop]`` along ``dim`` (0: rows, 1: columns of a 2-D tensor), reading only
        that part of a safetensors file (a tensor-parallel rank's shard: no full copy in its memory).
        A block-fp8 or pickled tensor is read whole and cut (those are not sharded at read yet)."""
        e = self.entries.get(name)
        if e is None or name in self._scales or name in self._pickled:
            return self.read(name, dtype, device).narrow(dim, start, stop - start).clone()
        if not 0 <= dim < len(e.shape) or not 0 <= start <= stop <= e.shape[dim]:
            raise Dsr1Error(f"tensor {name!r} of shape {list(e.shape)} has no slice {start}:{stop} along dim {dim}")
        item = e.dtype.itemsize
        outer = 1
        for d in e.shape[:dim]:
            outer *= d
        inner = item  # bytes of one index along dim (everything after it)
        for d in e.shape[dim + 1:]:
            inner *= d
        shape = (*e.shape[:dim], stop - start, *e.shape[dim + 1:])
        t = torch.empty(shape, dtype=e.dtype)
        if t.numel():
            # a read-only map of the tensor's bytes: the copy below touches only the pages of the slice
            raw = np.memmap(e.file, dtype=np.uint8, mode="r", offset=e.begin, shape=(outer, e.shape[dim] * inner))
            t.view(torch.uint8).numpy().reshape(outer, (stop - start) * inner)[:] = raw[:, start * inner: stop * inner]
            del raw
        return self._place(name, t, dtype, device)

    def _refuse_nonfinite(self, name: str, stored: torch.Tensor, placed: torch.Tensor) -> None:
        """NaN/Inf weights make a model generate garbage with no other sign: refuse them, naming the tensor."""
        counts = _nonfinite(stored)
        if counts is None:  # finite as stored: the cast to the compute dtype overflowed
            raise Dsr1Error(
                f"tensor {name!r} of the checkpoint in {str(self.model_dir)!r} has values beyond the range of "
                f"{str(placed.dtype).removeprefix('torch.')} (they would become Inf); load it in bfloat16 or float32"
            )
        where = self.entries[name].file.name if name in self.entries else "pickle checkpoint"
        raise Dsr1Error(
            f"checkpoint in {str(self.model_dir)!r} holds NaN/Inf: tensor {name!r} ({where}) has {counts[0]} NaN "
            f"and {counts[1]} Inf of {stored.numel()} values; the weights are corrupt (re-download or re-export "
            f"them), or load with allow_nonfinite=True to inspect them anyway"
        )

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._pickled.clear()


def block_fp8_reader(model: Dsr1Model) -> CheckpointReader | None:
    """A reader of the block-fp8 checkpoint ``model`` was built from (for the fp8 quant plugin, which keeps
    the stored e4m3 weights and scales instead of re-quantizing the dequantized ones); ``None`` when the
    model was not built from a block-fp8 checkpoint dir. The caller closes it."""
    if not isinstance(model, Dsr1Model):
        return None
    try:
        model_dir = model.pipeline.model_dir
    except AttributeError:  # no runtime bound: not built by a model builder from a checkpoint dir
        return None
    if model_dir is None or block_fp8_config(model.config) is None:
        return None
    # the builder has read these tensors already, refusing NaN/Inf unless the user allowed them
    return CheckpointReader(Path(model_dir), allow_nonfinite=True)
