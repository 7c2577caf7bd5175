"""The abstract base class of each plugin family.

Each class has a small required surface (its abstract methods). Optional features
are *declared* as capabilities in the plugin's :class:`~dsr1.specs.PluginSpec`, and
``validate(...)`` returns human-readable reasons why an implementation does not fit a
setting (an empty list means it fits). Every implementation is constructed as
``Impl(options)`` with its validated pydantic options model.

Tensor shape conventions used throughout:
``B`` batch, ``T`` query length, ``S`` key length, ``H`` query heads, ``Hkv`` key/value
heads, ``D`` head dim, ``V`` vocab size.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from dsr1.specs import NoOptions

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


class Plugin(ABC):
    """Common base: holds the validated options."""

    #: Options model used when the class is instantiated without a spec.
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        """Reasons this implementation cannot run on ``device`` / ``dtype`` (empty: it can)."""
        return []


# --- attention ----------------------------------------------------------------------------


class AttentionMechanism(Plugin):
    """The attention computation of one layer.

    ``forward(query, key, value)`` is the seed's plugin shape and is all a plugin
    must implement. ``query`` is ``(B, H, T, D)``; ``key``/``value`` are ``(B, Hkv, S, D)``
    with ``H % Hkv == 0`` (grouped-query attention); the result is ``(B, H, T, D)``.

    ``mask`` is ``None`` (plain causal attention with the last ``T`` keys aligned to
    the queries) or a boolean ``(B, 1, T, S)`` tensor, ``True`` where a query may attend
    a key: the engine folds causality, padding and sliding windows into it. ``scale``
    defaults to ``D ** -0.5``.
    """

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attend ``query`` to ``key``/``value``; returns ``(B, H, T, D)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    def configure(self, hf_config: Mapping[str, Any]) -> None:
        """Called once at build time with the checkpoint's ``config.json`` (e.g. to read
        ``sliding_window``). Default: nothing to read."""

    # --- recurrent attention (capability ``recurrent``) --------------------------------------
    # A plugin that declares ``recurrent`` decodes from a fixed-size state per layer instead of
    # a growing K/V cache. ``forward`` is still its cache-free (parallel) form.

    def state_shapes(self, batch: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Name → shape of each state tensor one layer keeps (fixed, independent of length)."""
        raise NotImplementedError(f"{type(self).__name__} does not declare the 'recurrent' capability")

    def forward_recurrent(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        state: dict[str, torch.Tensor],
        key_valid: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attend the ``T`` new queries ``(B, H, T, D)`` to every earlier token (held in
        ``state``) and causally to the ``T`` new keys/values ``(B, Hkv, T, D)``; then fold the
        new tokens into ``state`` in place. ``key_valid`` ``(B, T)`` is False for padding
        tokens, which must leave ``state`` unchanged. Returns ``(B, H, T, D)``."""
        raise NotImplementedError(f"{type(self).__name__} does not declare the 'recurrent' capability")


# --- device ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """Whether a device backend can run here, and why not."""

    available: bool
    reason: str = ""
    device_count: int = 0


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    free: int
    used: int


class Device(Plugin):
    """A hardware backend. Importing it must not start the device runtime."""

    #: torch device type (``"cpu"``, ``"cuda"``, ``"mlu"``, ``"npu"``).
    torch_device_type: ClassVar[str] = "cpu"
    #: collective backend name for multi-device work (``"gloo"``, ``"nccl"``, ``"cncl"``, ``"hccl"``).
    collective_backend: ClassVar[str] = "gloo"
    #: environment variable that restricts visible devices (empty when none).
    visible_devices_env: ClassVar[str] = ""

    @abstractmethod
    def probe(self) -> ProbeResult:
        """Available or not, with the reason, without side effects on failure."""

    @abstractmethod
    def device_count(self) -> int: ...

    @abstractmethod
    def memory_info(self, index: int = 0) -> MemoryInfo: ...

    @abstractmethod
    def synchronize(self, index: int = 0) -> None: ...

    @abstractmethod
    def supported_dtypes(self) -> list[torch.dtype]: ...

    def torch_device(self, index: int = 0) -> torch.device:
        import torch

        if self.torch_device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.torch_device_type, index)

    def compile_backend(self) -> tuple[str, dict[str, Any]] | None:
        """``torch.compile`` backend name and its options for this device (``None``: it has none,
        and the graph passes that fuse kernels refuse it, or run unfused if the config allows)."""
        return "inductor", {}

    def autotune_settings(self, strategy: str) -> dict[str, Any]:
        """Compile/tiling options for ``tiling_strategy`` (``"auto"`` or ``"fixed"``)."""
        return {"mode": "max-autotune-no-cudagraphs"} if strategy == "auto" else {}

    def pack_linear(self, linear: Any) -> Any | None:
        """A module that computes ``linear`` (a ``torch.nn.Linear``) from this device's own weight
        layout and kernel, or ``None`` to keep the layer as it is (the default).

        The engine asks once per layer, after every plugin that rewrites weights has run and
        before the first generate; the module it gets must give the same ``state_dict()`` as the
        layer it replaces, so saved checkpoints stay plain.
        """
        return None

    @contextlib.contextmanager
    def relayout_memory(self) -> Iterator[None]:
        """Scope in which the engine loads or relayouts weights, buffer by buffer.

        A device whose allocator would keep the freed old buffers resident (and so count them
        in the process's peak) returns them to the system inside it; the default does nothing.
        """
        yield


# --- quant / pruning ------------------------------------------------------------------------


class QuantPolicy(Plugin):
    """A precision / quantization policy applied to a built model, in place."""

    #: SQNR (dB) the policy guarantees against fp32 on the conformance cases.
    sqnr_threshold: ClassVar[float] = 20.0

    @abstractmethod
    def quantize_(self, model: torch.nn.Module) -> torch.nn.Module:
        """Convert ``model`` in place; returns it."""

    @abstractmethod
    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize one weight: the round trip the kit checks."""

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Largest ``|quantize_tensor(weight) - weight|`` per element, broadcastable to
        ``weight.shape`` (``None``: no elementwise bound declared, only ``sqnr_threshold``)."""
        return None

    def compute_dtype(self) -> torch.dtype | None:
        """The activation dtype this policy runs in (``None``: keep the checkpoint's)."""
        return None


class Pruner(Plugin):
    """A sparsification strategy.

    ``score`` ranks weights (higher = more important); ``mask`` keeps the best
    ``1 - sparsity`` fraction; ``prune_`` zeroes the rest of every prunable linear layer
    in place and returns the masks by module name.
    """

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        #: layers the last ``prune_`` left as they were, with the reason (``dsr1 prune`` reports them).
        self.skipped: dict[str, str] = {}

    @abstractmethod
    def score(self, weight: torch.Tensor, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Importance of each weight, same shape as ``weight``."""

    @abstractmethod
    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean keep-mask of ``weight``'s shape with ``sparsity`` of it False."""

    def prune_(
        self,
        model: torch.nn.Module,
        sparsity: float,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Zero the pruned weights of every ``nn.Linear`` except the output head."""
        import torch

        masks: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                keep = self.mask(module.weight.data, sparsity)
                module.weight.data.mul_(keep)
                masks[name] = keep
        return masks


# --- preprocess / model ---------------------------------------------------------------------


class Preprocessor(Plugin):
    """Text → token batches. Built per checkpoint with :meth:`load`."""

    @abstractmethod
    def load(self, model_dir: Path) -> Any:
        """Return a tokenizer object for the checkpoint in ``model_dir``."""


class ModelBuilder(Plugin):
    """Checkpoint dir → ``torch.nn.Module`` for one or more ``model_type`` values."""

    #: ``config.json`` ``model_type`` values this builder accepts.
    model_types: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def build(self, model_dir: Path, hf_config: dict[str, Any], pipeline: Any) -> Any:
        """Build the model on the meta device, assign weights, place it, return it."""


# --- graph / pool ---------------------------------------------------------------------------


class GraphPass(Plugin):
    """A graph-level rewrite applied once, after weights are placed."""

    @abstractmethod
    def apply(self, model: Any, device: Device) -> Any:
        """Return the rewritten model (may be the same object)."""


class Pool(Plugin):
    """Placement of a model's modules over devices and memory tiers."""

    @abstractmethod
    def place(self, model: torch.nn.Module, device: Device) -> torch.nn.Module:
        """Move ``model`` (or parts of it) to where it should run; returns it."""


# --- scheduler ------------------------------------------------------------------------------


@dataclass
class Request:
    """One generation request (plain data: the scheduler never touches tensors)."""

    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False


class Scheduler(Plugin):
    """Groups requests into batches."""

    @abstractmethod
    def add(self, request: Request) -> None: ...

    @abstractmethod
    def next_batch(self) -> list[Request]:
        """The requests to run in the next step (empty when idle)."""

    @abstractmethod
    def has_pending(self) -> bool: ...


# --- kv cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    batch_size: int
    max_len: int
    n_kv_heads: int
    head_dim: int


class KVCache(Plugin):
    """Per-layer key/value storage for incremental decoding.

    ``allocate`` is called once per ``generate`` call; ``update`` is called by each
    layer on every forward with the new keys/values ``(B, Hkv, T, D)`` written at
    positions ``[start, start + T)``; it returns the keys/values attention should see,
    ``(B, Hkv, S, D)``.

    Caches that keep fewer tokens than were written (``compresses = True``: streaming,
    heavy-hitter) still return every key a prefill needs from ``update`` and evict
    afterwards; the model then asks :meth:`select_mask` for the columns of the slots they
    returned. A cache with ``observes_queries = True`` gets each layer's queries through
    :meth:`observe` after attention (to score tokens). Both flags are read once at build
    time, never looked up per token.

    Every cache also keeps fixed-size per-layer *state* for recurrent attention
    (:meth:`state`), so a linear-attention model runs with any cache plugin.
    """

    #: keeps fewer slots than were written; the model calls :meth:`select_mask`.
    compresses: ClassVar[bool] = False
    #: wants each layer's queries through :meth:`observe`.
    observes_queries: ClassVar[bool] = False

    @abstractmethod
    def allocate(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None: ...

    @abstractmethod
    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the cache holds now (K/V storage; :meth:`state_nbytes` counts the states)."""

    def reset(self) -> None:
        """Forget all stored tokens (keeps the allocation)."""

    def select_mask(self, layer: int, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` ``(B, 1, T, S_written)`` over written slots → ``(B, 1, T, S)`` over the
        slots the last ``update`` of ``layer`` returned (identity unless ``compresses``)."""
        return mask

    def observe(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> None:
        """See the queries ``(B, H, T, D)`` that attended ``key`` ``(B, Hkv, S, D)`` (only
        called when ``observes_queries``)."""

    # --- fixed-size recurrent state -----------------------------------------------------------

    def state(
        self, layer: int, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The state tensors of ``layer`` (zeros after :meth:`clear_state`), made on first use."""
        import torch

        states: dict[int, dict[str, torch.Tensor]] = self.__dict__.setdefault("_states", {})
        checked: dict[int, tuple[Mapping[str, tuple[int, ...]], torch.dtype]] = self.__dict__.setdefault(
            "_states_checked", {})
        have = states.get(layer)
        last = checked.get(layer)
        if have is not None and last is not None and last[0] is shapes and last[1] == dtype:
            return have  # the same shapes object as the last call (the per-token path): already checked
        if have is None or any(
            name not in have or tuple(have[name].shape) != tuple(shape) or have[name].dtype != dtype
            for name, shape in shapes.items()
        ):
            have = {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes.items()}
            states[layer] = have
        checked[layer] = (shapes, dtype)
        return have

    def clear_state(self) -> None:
        """Zero every state tensor (called at the start of each ``generate``)."""
        import torch

        with torch.inference_mode():  # states made during an inference-mode forward are inference tensors
            for tensors in self.__dict__.get("_states", {}).values():
                for t in tensors.values():
                    t.zero_()

    def state_nbytes(self) -> int:
        return sum(t.nbytes for tensors in self.__dict__.get("_states", {}).values() for t in tensors.values())


# --- decoding -------------------------------------------------------------------------------


class SamplingParams(BaseModel):
    """Per-call sampling settings (validated: bad values raise one-line errors)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


class Decoder(Plugin):
    """Chooses the next token from logits, and decides when a sequence stops."""

    @abstractmethod
    def next_token(
        self,
        logits: torch.Tensor,
        generated: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """``logits`` ``(B, V)``, ``generated`` ``(B, L)`` ids so far → next ids ``(B,)``."""

    def stopped(self, token_ids: Sequence[int], text: str, stop: Sequence[str], eos_ids: Sequence[int]) -> bool:
        """Whether a sequence is finished after its latest token."""
        return bool(token_ids) and token_ids[-1] in eos_ids or any(s and s in text for s in stop)


# --- monitor --------------------------------------------------------------------------------


class Monitor(Plugin):
    """Receives telemetry: spans, counters and byte gauges. Must be cheap."""

    @abstractmethod
    def record(self, event: str, **values: Any) -> None:
        """Store one event (``"prefill"``, ``"decode"``, ``"kvcache.bytes"``...)."""

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Plain-data summary of what was recorded."""

    def stream(self) -> Iterator[dict[str, Any]]:
        """Recorded events, oldest first."""
        return iter(())


#: Base class of each family, by family name.
BASE_CLASSES: dict[str, type[Plugin]] = {
    "preprocess": Preprocessor,
    "model": ModelBuilder,
    "attention": AttentionMechanism,
    "device": Device,
    "quant": QuantPolicy,
    "pruning": Pruner,
    "graph": GraphPass,
    "pool": Pool,
    "scheduler": Scheduler,
    "kvcache": KVCache,
    "decoding": Decoder,
    "monitor": Monitor,
}
