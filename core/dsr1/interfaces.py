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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from dsr1.decoding.params import SamplingParams
from dsr1.specs import NoOptions

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from dsr1.engine.blocks import BlockManager
    from dsr1.engine.plan import SchedulerOutput
    from dsr1.engine.request import Request as EngineRequest


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


class AttentionContext(ABC):
    """What a layer attends through when the engine runs rows of different positions together.

    Built once per forward by the engine's runner (block tables, slots, masks), handed to the
    model in place of a :class:`KVCache`; each attention layer calls :meth:`attend` once.
    """

    @abstractmethod
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Any, scale: float,
        windowed: bool,
    ) -> torch.Tensor:
        """Store this step's ``k``/``v`` ``(B, Hkv, T, D)`` for ``layer`` and return the attention
        output ``(B, H, T, D)`` of ``q`` ``(B, H, T, D)`` over each row's context (``attn``: the
        layer's bound attention call; ``windowed``: the layer uses the model's sliding window)."""


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
    def memory_info(self, index: int | None = None) -> MemoryInfo:
        """The memory of device ``index`` (None: :meth:`local_index`)."""

    @abstractmethod
    def synchronize(self, index: int | None = None) -> None: ...

    @abstractmethod
    def supported_dtypes(self) -> list[torch.dtype]: ...

    @staticmethod
    def local_index() -> int:
        """This process's device: ``LOCAL_RANK`` when ``torchrun`` launched several ranks (one device
        each on a machine), else 0. Every ``index=None`` of this interface means it."""
        import os

        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return int(os.environ.get("LOCAL_RANK", "0") or 0)
        return 0

    def torch_device(self, index: int | None = None) -> torch.device:
        import torch

        if self.torch_device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.torch_device_type, self.local_index() if index is None else index)

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

    def needs_calibration(self) -> bool:
        """Whether :meth:`prune_` with these options needs calibration batches (activation-aware
        scores). The engine refuses ``pruning:`` at load without the ``calibration`` option then,
        before any weight is read. Default: no."""
        return False

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
    """Checkpoint dir → ``torch.nn.Module`` for one or more ``model_type`` values, which the
    plugin's ``PluginSpec`` declares as ``model_type:<t>`` capabilities (how a builder is chosen)."""

    @abstractmethod
    def build(self, model_dir: Path, hf_config: dict[str, Any], pipeline: Any) -> Any:
        """Build the model on the meta device, assign weights, place it, return it."""


# --- graph / pool ---------------------------------------------------------------------------


@dataclass
class GraphSteps:
    """What a graph pass hands the engine: the step functions it runs instead of the model's
    eager ones. The model's runtime (``dsr1.models.common.ModelRuntime``) holds them; nothing is
    attached to the model. All fields empty: the model's own ``forward_step``, eagerly.
    """

    #: replaces ``model.forward_step`` (same signature) for decode steps, e.g. its ``torch.compile``'d version.
    decode_step: Callable[..., Any] | None = None
    #: static-shape decode steps per (batch, cache capacity), optionally captured as CUDA graphs
    #: (``dsr1.graph.cudagraph.DecodeGraphs``: ``runner(model, cache, key_valid)`` gives the step).
    decode_graphs: Any = None
    #: the ``torch.compile`` arguments the pass used (for reports), or None.
    compile_kwargs: dict[str, Any] | None = None
    #: what a pass that decides at run time chose so far, as plain data (graph ``adaptive``: the
    #: plan per (batch, context) bucket and its measured latencies), or None.
    report: Callable[[], dict[str, Any]] | None = None
    #: how the engine's paged decode runs its static step per batch bucket
    #: (:mod:`dsr1.graph.paged_plans`): ``chooser(rows, trial) -> plan name``; None: the runner's default.
    paged: Callable[[int, Callable[[str], Callable[[], Any]]], str] | None = None


class GraphPass(Plugin):
    """Builds the step functions of a model once, after its weights are placed."""

    @abstractmethod
    def apply(self, model: Any, device: Device) -> Any:
        """Return the :class:`GraphSteps` for ``model``, leaving the model as it is.

        The older form, returning the model itself (rewritten in place), still loads and
        means "no step functions" (an empty :class:`GraphSteps`)."""


class Pool(Plugin):
    """Placement of a model's weights over devices and memory tiers.

    The pool decides where weights live; model builders never pick a device themselves. At
    build the builder reads every checkpoint tensor straight onto :meth:`weight_device` (one
    copy, no detour through host memory); after the quant plugin has run, :meth:`place` puts
    the finished model (or parts of it) where it should run.
    """

    @abstractmethod
    def weight_device(self, device: Device) -> torch.device:
        """The torch device the builder reads the checkpoint's tensors onto, for the selected
        ``device`` plugin (the device the model computes on)."""

    @abstractmethod
    def place(self, model: torch.nn.Module, device: Device) -> torch.nn.Module:
        """Move ``model`` (or parts of it) to where it should run; returns it."""

    def use_devices(self, extra: list[str]) -> bool:
        """Devices besides the compute device that the pool may run modules on, from a config's
        ``device: [cuda, cpu]`` (``extra`` is ``["cpu"]`` there). Called once, before the model is
        built. Returns whether the pool takes them; the default keeps everything on the compute
        device and does not, which refuses the config."""
        return False

    def kv_swap(self, kv_bytes_per_token: int, device: torch.device) -> SwapPolicy | None:
        """Whether the engine may swap a preempted request's KV blocks to host memory instead of
        recomputing them, and how much host memory it may use: ``None`` (the default) means
        always recompute. Asked once, when the engine sizes its KV pool."""
        return None


@dataclass
class SwapPolicy:
    """A pool's answer to :meth:`Pool.kv_swap`: a host swap space and the rule that picks swap over recompute."""

    #: bytes of host memory the swapped-out KV blocks may take in all.
    host_bytes: int
    #: ``should_swap(num_tokens)``: True when copying ``num_tokens`` tokens' KV out and back is
    #: cheaper than computing them again (the pool's cost model decides).
    should_swap: Callable[[int], bool]
    #: pinned host memory (faster copies to and from the device); False on a CPU-only machine.
    pin: bool = False


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
    """Decides, each engine step, which requests run and how many of their tokens.

    Works on plain data only (:class:`dsr1.engine.request.Request`, block ids from a
    :class:`dsr1.engine.blocks.BlockManager`), never tensors. The engine loop is
    ``plan = schedule()`` → the runner executes ``plan`` → ``update(plan, sampled, stopped)``.
    The scheduler owns every request from :meth:`add` until it finishes or is aborted, and
    frees its KV blocks then. The SDK's ``SchedulerConformance`` kit checks all of this.
    """

    @abstractmethod
    def bind(self, blocks: BlockManager, max_model_len: int) -> None:
        """Called once by the engine: the KV pool to allocate from and the model's context length.
        Options that cannot work with them are a one-line :class:`~dsr1.errors.Dsr1Error`."""

    @abstractmethod
    def add(self, request: EngineRequest) -> None:
        """Queue a new request. One-line ``Dsr1Error`` (with the numbers) when it can never run:
        prompt + ``max_tokens`` longer than ``max_model_len``, more blocks than the whole pool
        holds, or an id already in use by a live request."""

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Plan the next step (allocating the blocks it needs); an empty plan when idle."""

    @abstractmethod
    def update(
        self, output: SchedulerOutput, sampled: Mapping[str, int], stopped: Mapping[str, str]
    ) -> list[EngineRequest]:
        """Apply an executed plan: advance each scheduled request's computed tokens, append
        ``sampled[id]`` to the rows that sampled, finish those in ``stopped`` (reason ``"stop"``)
        or at ``max_tokens`` (``"length"``) and free their blocks. Returns the requests that
        finished in this update."""

    @abstractmethod
    def abort(self, request_id: str) -> EngineRequest:
        """Finish a live request now and free its blocks; ``Dsr1Error`` naming the id if it is
        unknown or already finished."""

    @abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""

    @abstractmethod
    def get(self, request_id: str) -> EngineRequest | None:
        """The live (waiting or running) request with this id, else ``None``."""

    @property
    @abstractmethod
    def num_running(self) -> int: ...

    @property
    @abstractmethod
    def num_waiting(self) -> int: ...


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
    :meth:`observe` after attention (to score tokens). Both are class attributes: a layer
    reads them on every forward (an attribute lookup, never a call into the plugin).

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


# SamplingParams (per-request settings, validated with one-line errors) lives in
# dsr1.decoding.params so the scheduler, decoders and detokenizer share it; imported above.


class Decoder(Plugin):
    """Chooses next tokens from logits, with each request's own :class:`SamplingParams`.

    A plugin implements :meth:`next_token` (one ``params`` for a whole batch, as ``generate``
    uses it); the engine calls :meth:`next_tokens` (a different ``params`` per row) and
    :meth:`logprobs`, whose defaults here build on ``next_token``. Stopping and incremental
    text live in :mod:`dsr1.decoding.detokenize`.
    """

    @abstractmethod
    def next_token(
        self,
        logits: torch.Tensor,
        generated: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
        outputs: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """``logits`` ``(B, V)``, ``generated`` ``(B, L)`` prompt + output ids so far → next ids ``(B,)``.

        ``outputs`` holds each row's output ids alone (logits processors and presence/frequency
        penalties act on those); callers pass it whenever ``params.penalized``. ``logits`` is
        not modified."""

    def next_tokens(
        self,
        logits: torch.Tensor,
        outputs: Sequence[list[int]],
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """One engine step: row ``i`` of ``logits`` ``(B, V)`` with ``params[i]``, its prompt and
        output ids and its generator → next ids ``(B,)``; equal to row-by-row ``next_token`` calls.

        Rows that are greedy and unpenalized take one vectorised argmax; the others go row by
        row (repetition penalty over prompt + output ids, as transformers; presence/frequency
        and logits processors over output ids). ``logits`` is not modified."""
        if not len(params) == len(outputs) == len(prompts) == len(generators) == logits.shape[0]:
            raise ValueError(f"next_tokens: {logits.shape[0]} rows of logits, {len(params)} params, {len(outputs)} "
                             f"outputs, {len(prompts)} prompts, {len(generators)} generators")
        tokens = logits.max(dim=-1).indices  # (B,): the first maximum, as argmax
        for i, p in enumerate(params):
            if p.greedy and not p.penalized:
                continue
            generated = self.generated_ids(tokens, prompts[i], outputs[i], p)  # (1, L)
            tokens[i] = self.next_token(logits[i : i + 1], generated, p, generators[i], outputs=[outputs[i]])[0]
        return tokens

    def generated_ids(
        self, like: torch.Tensor, prompt: Sequence[int], output: Sequence[int], params: SamplingParams
    ) -> torch.Tensor:
        """The ``generated`` ``(1, L)`` that :meth:`next_tokens` hands :meth:`next_token` for one row:
        prompt + output ids, long on ``like``'s device. A decoder that reads them only for some
        params may return less (building it copies the whole prompt every step)."""
        return like.new_tensor([[*prompt, *output]])

    def logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of the distribution ``logits`` ``(B, V)`` stands for: of ``tokens``
        ``(B,)`` → ``(B,)``, and the ``n`` most likely ids ``(B, n)`` with theirs ``(B, n)``,
        most likely first (``n = 0``: empty ``(B, 0)``).

        Which distribution is the caller's choice; the engine passes the model's raw logits
        (vLLM v1's default ``raw_logprobs``): the model's own belief, before processors,
        penalties, temperature and truncation, the same whatever the request's sampling."""
        lp = logits.float().log_softmax(dim=-1)  # (B, V)
        chosen = lp.gather(1, tokens.reshape(-1, 1).to(lp.device)).squeeze(1)  # (B,)
        top = lp.topk(min(n, lp.shape[-1]), dim=-1)  # (B, n)
        return chosen, top.indices, top.values

    def stopped(self, token_ids: Sequence[int], text: str, stop: Sequence[str], eos_ids: Sequence[int]) -> bool:
        """Whether a sequence is finished after its latest token."""
        return bool(token_ids) and token_ids[-1] in eos_ids or any(s and s in text for s in stop)


# --- monitor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStats:
    """What a monitor knows about the generation it watched, in the engine's own terms.

    ``None``: the monitor did not keep it (callers print it as unknown, never as 0). Read by
    ``dsr1 generate --json`` through :meth:`Monitor.generation_stats`, so any monitor works there.
    """

    #: seconds spent in prefill / in the decode loop, summed over the recorded generate calls.
    prefill_s: float | None = None
    decode_s: float | None = None
    #: tokens the decode loop produced, and ``decode_tokens / decode_s``.
    decode_tokens: int | None = None
    decode_tok_s: float | None = None
    #: bytes the KV cache (and recurrent states) held at the last recorded generate.
    kvcache_bytes: int | None = None


@dataclass(frozen=True)
class OperatorStat:
    """Latency of one operator (or of the whole ``"step"``) in one bucket of engine steps.

    Steps fall in a bucket by phase (``"prefill"``: some request fed more than one token;
    ``"decode"``) and by their batch size and longest context, each rounded up to a power of two.
    Read by the server's ``/metrics`` through :meth:`Monitor.operator_stats`.
    """

    phase: str
    batch_bucket: int
    context_bucket: int
    #: ``"step"``, or a sub-block: ``"norm"``, ``"qkv"``, ``"attention"``, ``"o_proj"``, ``"mlp"``...
    operator: str
    #: the steps measured, their mean and (population) variance, in seconds per step
    count: int
    mean_s: float
    variance_s: float


class Monitor(Plugin):
    """Receives telemetry: spans, counters and byte gauges. Must be cheap.

    The engine records these events (once per ``generate`` call or engine step, never per token):

    * ``"prefill"``: ``seconds``, ``tokens``, ``batch_size``;
    * ``"decode"``: ``seconds``, ``tokens``, ``steps``, ``batch_size``;
    * ``"kvcache.bytes"``: ``bytes`` (a gauge: the last value counts);
    * ``"engine.step"`` (the engine loop) and ``"quant.switch"`` (dynamic precision) with their own values.

    Callers read a monitor only through :meth:`generation_stats` (typed, the same for every
    monitor) and :meth:`stream`; the layout of :meth:`summary` is each plugin's own.

    A monitor that sets :attr:`watches_steps` is also called around every engine step
    (:meth:`begin_step` / :meth:`end_step`) and handed the model once per engine (:meth:`attach`).
    Those calls are plain method calls on the resolved object (never through pluggy), so what a
    monitor does in them is the whole cost it adds to a step.
    """

    #: whether the engine calls :meth:`attach`, :meth:`begin_step` and :meth:`end_step` (checked
    #: once per engine; a monitor that leaves it False costs a step nothing).
    watches_steps: ClassVar[bool] = False

    @abstractmethod
    def record(self, event: str, **values: Any) -> None:
        """Store one event (``"prefill"``, ``"decode"``, ``"kvcache.bytes"``...)."""

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Plain-data summary of what was recorded, in the plugin's own layout (for people)."""

    def stream(self) -> Iterator[dict[str, Any]]:
        """Recorded events, oldest first, each ``{"event": name, **values}``."""
        return iter(())

    def attach(self, model: torch.nn.Module) -> None:
        """The model the engine runs (once per engine, before its first step; ``watches_steps`` only)."""

    def begin_step(self, batch_size: int, context_len: int, tokens: int) -> None:
        """An engine step starts: ``batch_size`` requests, the longest at ``context_len`` tokens after the
        step, ``tokens`` fed in all (``watches_steps`` only)."""

    def end_step(self) -> None:
        """The step begun last has its sampled ids on the host (also called when it raised)."""

    def operator_stats(self) -> list[OperatorStat]:
        """Per-bucket operator latencies (:class:`OperatorStat`); empty: the monitor keeps none."""
        return []

    def generation_stats(self) -> GenerationStats:
        """The figures of :class:`GenerationStats` from the recorded events.

        The reference implementation folds :meth:`stream` (sums of the ``prefill`` and
        ``decode`` spans, the last ``kvcache.bytes``); a monitor that keeps no event list
        overrides it with what it keeps, or leaves fields ``None``."""
        sums: dict[tuple[str, str], float] = {}
        seen: set[str] = set()
        kv: int | None = None
        for e in self.stream():
            name = e.get("event")
            if name in ("prefill", "decode"):
                seen.add(name)
                for key in ("seconds", "tokens"):
                    value = e.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        sums[(name, key)] = sums.get((name, key), 0) + value
            elif name == "kvcache.bytes" and isinstance(e.get("bytes"), int):
                kv = int(e["bytes"])
        decode_s = sums.get(("decode", "seconds")) if "decode" in seen else None
        tokens = sums.get(("decode", "tokens")) if "decode" in seen else None
        return GenerationStats(
            prefill_s=sums.get(("prefill", "seconds")) if "prefill" in seen else None,
            decode_s=decode_s,
            decode_tokens=int(tokens) if tokens is not None else None,
            decode_tok_s=tokens / decode_s if tokens is not None and decode_s else None,
            kvcache_bytes=kv,
        )


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
