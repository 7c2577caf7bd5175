"""Finding, building and writing Hugging Face-format model directories.

* :func:`resolve_model_dir` turns a name or path into a directory, looking in a fixed,
  documented order and naming every place it looked when it finds nothing.
* :class:`CheckpointBuilder` and the helpers beside it (:func:`check_names`, :func:`choose_dtype`,
  :func:`assign_weights_`) build a model from a :class:`~dsr1.models.checkpoint.CheckpointReader`,
  which reads the weights tensor by tensor (:mod:`dsr1.models.checkpoint`).
* :func:`save_pretrained` writes ``config.json`` + ``model.safetensors`` (+ tokenizer
  files) into a temporary directory and renames it into place: nothing is half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from dsr1.errors import Dsr1Error
from dsr1.input_files import is_regular, kind, list_dir, probe, read_text
from dsr1.interfaces import GraphSteps, ModelBuilder
from dsr1.models.checkpoint import DTYPE_NAMES, CheckpointReader
from dsr1.models.common import Dsr1Model, ModelRuntime
from dsr1.models.hf_fields import check_dtype, token_ids
from dsr1.outputs import plan_output

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
    #: load a checkpoint whose floating-point tensors hold NaN/Inf (refused by default: such a
    #: model generates garbage without any other sign; this is for inspecting a broken one).
    allow_nonfinite: bool = False


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
    what = "Hugging Face hub cache entry"
    st = probe(snapshots, what)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return None
    ref = repo / "refs" / "main"
    if is_regular(ref, what):
        try:
            candidate = snapshots / read_text(ref, what).strip()
        except UnicodeDecodeError:
            raise Dsr1Error(f"{what} {str(ref)!r} is not a text file (it should hold a revision hash)") from None
        if probe(candidate / "config.json", what) is not None:
            return candidate
    found = [snapshots / n for n in list_dir(snapshots, what)]
    found = sorted((p for p in found if probe(p / "config.json", what) is not None), key=lambda p: p.stat().st_mtime)
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
    # probe, not exists(): a symlink loop, a dangling link or no permission is named, not "not found"
    st = probe(path, "model path")
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise Dsr1Error(f"model path {name!r} is a {kind(st.st_mode)}; pass the directory that holds config.json")
        if probe(path / "config.json", "model file") is None:
            raise Dsr1Error(f"model directory {name!r} has no config.json (not a Hugging Face-format model dir)")
        return path
    if _looks_like_path(name):
        raise Dsr1Error(f"model path {name!r} does not exist")
    looked: list[str] = [f"path {str(path)!r}"]
    home = dsr1_home() / "models" / name
    looked.append(str(home))
    if probe(home / "config.json", "DSR1_HOME path") is not None:
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
    if probe(cfg_path, "model file") is None:
        raise Dsr1Error(f"model directory {str(model_dir)!r} has no config.json (not a Hugging Face-format model dir)")
    try:
        data = json.loads(read_text(cfg_path, "model file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Dsr1Error(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise Dsr1Error(f"{cfg_path} must hold a JSON object")
    if "model_type" not in data:
        raise Dsr1Error(f"{cfg_path} has no 'model_type'; supported: bert, llama, mistral, qwen2, qwen3")
    for key in ("torch_dtype", "dtype"):  # the builders read the weights' dtype; a bad name is still refused
        check_dtype(data, key)
    token_ids(data, "eos_token_id")
    return data



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


def build_state(pipeline: Any) -> dict[str, torch.Tensor]:
    """The dict a builder collects a model's tensors in: the pool's, when it keeps some of them out of
    memory while the model is read (``tiered`` with a disk tier), else a plain dict."""
    make = getattr(pipeline.pool, "build_state", None)
    return make(pipeline) if callable(make) else {}


def assign_weights_(model: Any, state: dict[str, torch.Tensor], tie_embeddings: bool, device: torch.device,
                    hf: Mapping[str, Any]) -> None:
    """Put ``state`` (every tensor of a model built on the meta device) into ``model`` without a copy;
    a tied ``lm_head`` shares the embedding's storage. ``state`` is emptied."""
    if tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    state.clear()
    if tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope.to(device)
    model.config = dict(hf)


class CheckpointBuilder(ModelBuilder):
    """A model builder whose :meth:`build_model` assigns a checkpoint reader's tensors to a model:
    ``build`` opens the directory's checkpoint, ``build_from`` takes any object with
    ``names/shape/read/float_dtype`` (in-memory tensors, random weights)."""

    options: LoadOptions

    def build_model(self, hf_config: Mapping[str, Any], reader: Any, pipeline: Any) -> Dsr1Model:
        raise NotImplementedError

    def build(self, model_dir: Path, hf_config: dict[str, Any], pipeline: Any) -> Any:
        reader = CheckpointReader(model_dir, allow_pickle=self.options.allow_pickle,
                                  allow_nonfinite=self.options.allow_nonfinite)
        try:
            model = self.build_model(hf_config, reader, pipeline)
        finally:
            reader.close()
        model = finish_model(model, pipeline)
        model.runtime.source_dir = model_dir
        return model

    def build_from(self, hf_config: dict[str, Any], reader: Any, pipeline: Any) -> Any:
        return finish_model(self.build_model(hf_config, reader, pipeline), pipeline)


def finish_model(model: Dsr1Model, pipeline: Any) -> Dsr1Model:
    """The steps after weights are assigned: quantize, place, graph pass. Binds the model's
    :class:`~dsr1.models.common.ModelRuntime` (the one place it is set) with the pass's steps."""
    model.requires_grad_(False)  # an inference engine: no autograd graph behind model(**inputs)
    runtime = model.bind_runtime(ModelRuntime(pipeline))  # quant and pool plugins may read model.pipeline
    pipeline.prune_(model)  # before quant: a quantized layer is no longer an nn.Linear to prune
    if getattr(pipeline, "quant", None) is not None:
        model = pipeline.quant.quantize_(model) or model
    model = pipeline.pool.place(model, pipeline.device)
    model.eval()
    steps = pipeline.graph.apply(model, pipeline.device)
    if not isinstance(steps, GraphSteps):  # the older form: the model itself, rewritten in place
        model, steps = steps, GraphSteps()
    model.bind_runtime(runtime).steps = steps
    return model


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


#: ``model_type`` of a dir written by ``dsr1 quantize`` (the real one is ``quantization_config.model_type``):
#: transformers' ``AutoModel`` and a dsr1 without this hook refuse an unknown model type, so
#: neither can load the integer tensors as plain weights. :mod:`dsr1.quantization.checkpoint` loads such a dir.
QUANTIZED_MODEL_TYPE = "dsr1_quantized"


def quantized_hf_config(config: dict[str, Any], quantization_config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a quantized save: the marker model type, the real one kept in the config."""
    real = config["model_type"] if config.get("model_type") != QUANTIZED_MODEL_TYPE else (
        config.get("quantization_config") or {}).get("model_type")
    return {**config, "model_type": QUANTIZED_MODEL_TYPE,
            "quantization_config": {**quantization_config, "model_type": real}}


def write_model_dir(model: Dsr1Model, directory: Path) -> None:
    """``config.json``, ``model.safetensors`` and the tokenizer files of ``model``, into ``directory``."""
    config = dict(model.config)
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    if getattr(model, "quantization_config", None):  # integer weights: config.json must say so
        config = quantized_hf_config(config, model.quantization_config)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_safetensors(directory / "model.safetensors", model.hf_state_dict(), {"format": "pt"})
    source = getattr(model, "source_dir", None)
    if source is not None:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, directory / name)


def save_pretrained(model: Dsr1Model, out: Path, overwrite: bool = True) -> Path:
    """Write ``model`` in Hugging Face format into ``out``, atomically (see :mod:`dsr1.outputs`).

    ``out`` may be new, empty, or a previous ``save_pretrained`` output (replaced unless
    ``overwrite`` is False); a dir holding anything else, or the model's own source dir or one
    containing it, is refused with a one-line error before anything is written.
    """
    source = getattr(model, "source_dir", None)
    plan = plan_output(out, "save_pretrained", overwrite=overwrite, inputs=[source] if source is not None else [],
                       label="save_pretrained dir", flag="overwrite=True")
    with plan.writing() as tmp:
        write_model_dir(model, tmp)
    return plan.given
