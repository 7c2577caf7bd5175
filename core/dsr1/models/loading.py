"""Reading and writing Hugging Face-format model directories.

* :func:`resolve_model_dir` turns a name or path into a directory, looking in a fixed,
  documented order and naming every place it looked when it finds nothing.
* :class:`CheckpointReader` indexes ``model.safetensors`` (or shards + index json, or an
  opted-in pickle checkpoint) without reading tensor data, validates it, then reads one
  tensor at a time straight into its final dtype and device (no second copy of the model).
* :func:`save_pretrained` writes ``config.json`` + ``model.safetensors`` (+ tokenizer
  files) into a temporary directory and renames it into place: nothing is half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from pydantic import BaseModel, ConfigDict

from dsr1.errors import Dsr1Error

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.models.common import Dsr1Model

#: Files copied along with the weights by ``save_pretrained``.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.txt",
    "perplexity.json",
)

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

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


class LoadOptions(BaseModel):
    """Options every builtin model builder takes (``AutoModel.from_pretrained`` fills them)."""

    model_config = ConfigDict(extra="forbid")

    #: compute dtype; ``None`` keeps the checkpoint's (or the quant policy's compute dtype).
    dtype: str | None = None
    #: allow ``*.bin`` / ``*.pt`` pickle checkpoints (loaded with ``weights_only=True``).
    allow_pickle: bool = False


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key == "auto":
        return None
    if key not in TORCH_DTYPES:
        raise Dsr1Error(f"unknown dtype {value!r}; use one of float32, float16, bfloat16")
    return TORCH_DTYPES[key]


# --- name resolution ------------------------------------------------------------------------


def dsr1_home() -> Path:
    return Path(os.environ.get("DSR1_HOME") or Path.home() / ".cache" / "dsr1").expanduser()


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets"


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "DSR1_OFFLINE"))


def _hub_snapshot(cache: Path, name: str) -> Path | None:
    """``models--org--name/snapshots/<rev>`` of the hub cache layout (``refs/main`` first)."""
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "config.json").is_file():
            return candidate
    found = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", os.sep)) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name


def resolve_model_dir(name_or_path: str | os.PathLike[str], download: bool = True) -> Path:
    """Find a model directory; the order is documented in bench/README.md and the issue.

    1. an existing path; 2. ``$DSR1_HOME/models/<name>`` (default ``~/.cache/dsr1``);
    3. the Hugging Face hub cache (``HF_HUB_CACHE`` / ``HF_HOME`` / ``~/.cache/huggingface/hub``);
    4. the models bundled in ``dsr1/assets``; 5. a hub download (only with ``huggingface_hub``
    installed and not offline).
    """
    name = os.fspath(name_or_path)
    if not name.strip():
        raise Dsr1Error("empty model name; pass a model directory or a name such as 'dsr1-tiny'")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Dsr1Error(f"model path {name!r} is a file; pass the directory that holds config.json")
        if not (path / "config.json").is_file():
            raise Dsr1Error(f"model directory {name!r} has no config.json (not a Hugging Face-format model dir)")
        return path
    if _looks_like_path(name):
        raise Dsr1Error(f"model path {name!r} does not exist")
    looked: list[str] = [f"path {str(path)!r}"]
    home = dsr1_home() / "models" / name
    looked.append(str(home))
    if (home / "config.json").is_file():
        return home
    cache = hf_hub_cache()
    looked.append(f"{cache}/models--{name.replace('/', '--')}/snapshots/*")
    snap = _hub_snapshot(cache, name)
    if snap is not None:
        return snap
    bundled = bundled_dir() / name
    looked.append(str(bundled))
    if (bundled / "config.json").is_file():
        return bundled
    reason = _try_download(name) if download else "download not requested"
    if isinstance(reason, Path):
        return reason
    looked.append(f"Hugging Face hub ({reason})")
    raise Dsr1Error(f"model {name!r} not found; looked in: {'; '.join(looked)}")


def _try_download(name: str) -> Path | str:
    if _offline():
        return "skipped: HF_HUB_OFFLINE/DSR1_OFFLINE is set"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return "skipped: huggingface_hub is not installed (pip install 'dsr1[hub]')"
    try:
        got = snapshot_download(
            repo_id=name,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "vocab.txt"],
        )
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes the one-line reason
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return f"download failed: {type(err).__name__}: {first}"
    return Path(got)


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise Dsr1Error(f"model directory {str(model_dir)!r} has no config.json (not a Hugging Face-format model dir)")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Dsr1Error(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise Dsr1Error(f"{cfg_path} must hold a JSON object")
    if "model_type" not in data:
        raise Dsr1Error(f"{cfg_path} has no 'model_type'; supported: bert, llama, mistral, qwen2")
    return data


# --- reading checkpoints -----------------------------------------------------------------------


class _Entry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def _read_safetensors_header(file: Path) -> dict[str, _Entry]:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Dsr1Error(f"safetensors file {str(file)!r} is truncated or corrupt ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise Dsr1Error(f"safetensors file {str(file)!r} is truncated or corrupt (header of {n} bytes, file {size})")
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


class CheckpointReader:
    """The tensors of one model directory, indexed without reading their data."""

    def __init__(self, model_dir: Path, allow_pickle: bool = False) -> None:
        self.model_dir = model_dir
        self.entries: dict[str, _Entry] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._files: dict[Path, BinaryIO] = {}
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            files = self._index_files(index)
        elif single.is_file():
            files = [single]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if files:
            for file in files:
                self.entries.update(_read_safetensors_header(file))
            return
        pickles = sorted([*model_dir.glob("*.bin"), *model_dir.glob("*.pt"), *model_dir.glob("*.pth")])
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

    def _index_files(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise Dsr1Error(f"{str(index)!r} is corrupt (no weight_map)") from None
        files = sorted({self.model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise Dsr1Error(f"{index.name} names shard(s) that are missing: {', '.join(missing)}")
        return files

    def names(self) -> set[str]:
        return set(self.entries) | set(self._pickled)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return self.entries[name].shape

    def float_dtype(self) -> torch.dtype | None:
        """The dtype most of the checkpoint's floating-point bytes are stored in."""
        weight: dict[torch.dtype, int] = {}
        for e in self.entries.values():
            if e.dtype.is_floating_point:
                weight[e.dtype] = weight.get(e.dtype, 0) + e.end - e.begin
        for t in self._pickled.values():
            if t.is_floating_point():
                weight[t.dtype] = weight.get(t.dtype, 0) + t.numel() * t.element_size()
        return max(weight, key=lambda d: weight[d]) if weight else None

    def read(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """One tensor, floating-point ones cast to ``dtype``, on ``device``."""
        if name in self._pickled:
            t = self._pickled.pop(name)
        else:
            e = self.entries[name]
            t = torch.empty(e.shape, dtype=e.dtype)
            f = self._files.get(e.file)
            if f is None:
                f = self._files[e.file] = e.file.open("rb")
            f.seek(e.begin)
            if e.end > e.begin:
                buf = t.reshape(-1).view(torch.uint8).numpy()
                got = f.readinto(buf)  # type: ignore[attr-defined]  # straight into the tensor's memory
                if got != e.end - e.begin:
                    raise Dsr1Error(f"safetensors file {str(e.file)!r} is truncated while reading {name!r}")
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if t.device != device else t

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._pickled.clear()


def check_names(
    reader: CheckpointReader,
    expected: Mapping[str, tuple[int, ...]],
    ignorable: Callable[[str], bool] = lambda n: False,
    rename: Callable[[str], str] = lambda n: n,
) -> dict[str, str]:
    """Match checkpoint names to the model's; returns model name → checkpoint name.

    Raises a one-line error naming missing tensors, unexpected tensors, or the first tensor
    whose shape differs (with both shapes).
    """
    present = {rename(n): n for n in reader.names()}
    missing = sorted(n for n in expected if n not in present)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise Dsr1Error(f"checkpoint in {str(reader.model_dir)!r} is missing {len(missing)} tensor(s): {shown}")
    extra = sorted(n for n in present if n not in expected and not ignorable(n))
    if extra:
        shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
        raise Dsr1Error(
            f"checkpoint in {str(reader.model_dir)!r} has {len(extra)} unexpected tensor(s): {shown} "
            f"(does config.json match these weights?)"
        )
    for name, shape in expected.items():
        got = reader.shape(present[name])
        if tuple(got) != tuple(shape):
            raise Dsr1Error(
                f"tensor {present[name]!r} has shape {tuple(got)} in the checkpoint, but config.json implies "
                f"{tuple(shape)}"
            )
    return {n: present[n] for n in expected}


def choose_dtype(options: LoadOptions, pipeline: Any, reader: CheckpointReader) -> torch.dtype:
    """Override, else the quant policy's compute dtype, else the checkpoint's; checked on the device."""
    dtype = parse_dtype(options.dtype)
    if dtype is None and getattr(pipeline, "quant", None) is not None:
        dtype = pipeline.quant.compute_dtype()
    if dtype is None:
        dtype = reader.float_dtype() or torch.float32
    try:
        supported = list(pipeline.device.supported_dtypes())
    except Exception:  # noqa: BLE001 - a device that cannot say accepts everything
        supported = []
    if supported and dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        raise Dsr1Error(f"device {type(pipeline.device).__name__} does not support {dtype}; use one of: {names}")
    return dtype


def finish_model(model: Dsr1Model, pipeline: Any) -> Dsr1Model:
    """The steps after weights are assigned: quantize, place, graph pass."""
    model.requires_grad_(False)  # an inference engine: no autograd graph behind model(**inputs)
    if getattr(pipeline, "quant", None) is not None:
        model = pipeline.quant.quantize_(model) or model
    model = pipeline.pool.place(model, pipeline.device)
    model.eval()
    result: Dsr1Model = pipeline.graph.apply(model, pipeline.device)
    return result


# --- writing -----------------------------------------------------------------------------------


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """A streaming safetensors writer: one tensor in memory at a time beyond the model."""
    items: list[tuple[str, torch.Tensor]] = []
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        if t.dtype not in DTYPE_NAMES:
            raise Dsr1Error(f"cannot save tensor {name!r} of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        items.append((name, t))
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment, as the reference writer does
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in items:
            data = t.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)  # the buffer, no bytes copy
        f.flush()
        os.fsync(f.fileno())


def save_pretrained(model: Dsr1Model, out: Path) -> Path:
    """Write ``model`` in Hugging Face format into ``out``, atomically."""
    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = dict(model.config)
        config["dtype"] = str(model.dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        if getattr(model, "quantization_config", None):  # integer weights: config.json must say so
            from dsr1.quantization.checkpoint import quantized_hf_config

            config = quantized_hf_config(config, model.quantization_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_safetensors(tmp / "model.safetensors", model.hf_state_dict(), {"format": "pt"})
        source = getattr(model, "source_dir", None)
        if source is not None:
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    shutil.copyfile(Path(source) / name, tmp / name)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
