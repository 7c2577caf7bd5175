"""Pieces shared by the model files: norms, masks, the attention call, the model bases (rotary embeddings:
:mod:`dsr1.models.rope`).

Shapes: ``B`` batch, ``T`` new tokens this forward, ``S`` keys attended, ``H`` query heads,
``Hkv`` key/value heads, ``D`` head dim. Masks are boolean, ``True`` = may attend.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.interfaces import GraphSteps
from dsr1.models.rope import RotaryEmbedding
from dsr1.parallel.pipeline import PipelineStage, pipelined_step

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.interfaces import AttentionMechanism


# --- outputs ------------------------------------------------------------------------------


class _Output:
    """Attribute and key access, like transformers' ``ModelOutput``."""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [k for k in self.__dataclass_fields__ if getattr(self, k) is not None]  # type: ignore[attr-defined]


@dataclass
class CausalLMOutput(_Output):
    logits: torch.Tensor  # (B, T, V)


@dataclass
class EncoderOutput(_Output):
    last_hidden_state: torch.Tensor  # (B, T, hidden)
    pooler_output: torch.Tensor | None = None  # (B, hidden), BERT's tanh pooler (None when absent)
    sentence_embedding: torch.Tensor | None = None  # (B, hidden), mean-pooled then L2-normalized


# --- norms --------------------------------------------------------------------------------


@functools.cache
def _cpu_kernels() -> Any:
    """The SDK's CPU kernels (``dsr1_sdk.kernels.cpu``) where they build and load, else ``None`` (one warning,
    from ``usable``). Imported here, not at the top: the SDK imports dsr1's core."""
    from dsr1_sdk.kernels import cpu

    return cpu if cpu.usable("RMSNorm", "torch's rms_norm") else None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like transformers' ``LlamaRMSNorm``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dim() == 3 and x.shape[1] == 1 \
                and _cpu_kernels() is not None:
            # eager CPU decode (B, 1, C): one C++ call (the SDK's), where torch's rms_norm is a handful of
            # dispatcher ops. Decided by the step's shape, not its row count, so a batch split into micro-batches
            # rounds as the whole; prefill and compiled steps keep torch's (inductor fuses it with its neighbours)
            return _cpu_kernels().rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused kernel, same math in fp32
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The slow path, op for op as transformers does it (used for half precision)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``; ``fused`` keeps gate and up as one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
            self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:  # reference path, as transformers
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 × (B, T, F) views
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # in place: no (B, T, F) temporaries


# --- masks ---------------------------------------------------------------------------------


def build_mask(key_valid: torch.Tensor, t: int, start: int, window: int | None = None) -> torch.Tensor:
    """Fold causality, padding and a sliding window into one boolean mask.

    :param key_valid: ``(B, S)`` True where a cache slot holds a real (non-padding) token.
    :param t: number of queries; they sit at cache slots ``[start, start + t)``.
    :param window: keys ``k`` with ``q - window < k <= q`` are visible (Mistral / transformers).
    :returns: ``(B, 1, T, S)``. Every query sees at least itself, so a padding row never
        becomes all-masked (that would give NaN and poison the batch through ``0 * NaN``).
    """
    s = key_valid.shape[1]
    q = torch.arange(start, start + t, device=key_valid.device)[:, None]  # (T, 1)
    k = torch.arange(s, device=key_valid.device)[None, :]  # (1, S)
    allowed = k <= q  # (T, S)
    if window is not None:
        allowed = allowed & (k > q - window)
    mask = allowed[None, None] & key_valid[:, None, None, :]  # (B, 1, T, S)
    return mask | (k == q)[None, None]


# --- the attention call ---------------------------------------------------------------------


class AttentionCall:
    """The attention plugin bound once at build time (no registry lookup per layer or token).

    If the plugin does not declare the ``gqa`` capability, keys/values are repeated to the
    query head count before the call. A plugin that declares ``recurrent`` decodes from a
    fixed-size state (:meth:`recurrent`) instead of the K/V cache.
    """

    def __init__(self, plugin: AttentionMechanism, n_rep: int, gqa: bool, recurrent: bool = False) -> None:
        self.plugin = plugin
        self.forward = plugin.forward
        self.n_rep = n_rep if not gqa else 1
        self.name = type(plugin).__name__
        self.recurrent = recurrent
        #: the plugin's state shapes by (batch, heads, key/value heads, head dim).
        self._state_shapes: dict[tuple[int, int, int, int], Mapping[str, tuple[int, ...]]] = {}

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
    ) -> torch.Tensor:
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(self.n_rep, dim=1)
        return self.forward(q, k, v, mask=mask, scale=scale)

    def recurrent_step(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
        scale: float | None, cache: Any,
    ) -> torch.Tensor:
        """Recurrent attention of the new tokens against ``layer``'s fixed-size state in ``cache``."""
        b, h, t, d = q.shape  # q (B, H, T, D); k, v (B, Hkv, T, D)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)  # (B, H, T, D)
            v = v.repeat_interleave(self.n_rep, dim=1)
        key = (b, h, k.shape[1], d)
        shapes = self._state_shapes.get(key)
        if shapes is None:  # once per batch shape, not per layer and token
            shapes = self._state_shapes[key] = self.plugin.state_shapes(*key)
        state = cache.state(layer, shapes, torch.float32, q.device)  # running sums: always fp32
        key_valid = mask[:, 0, -1, -t:] if mask is not None else None  # (B, T): the last query sees every real key
        return self.plugin.forward_recurrent(q, k, v, state, key_valid=key_valid, scale=scale)


def plugin_capabilities(pipeline: Any, family: str) -> frozenset[str]:
    """The declared capabilities of the plugin a pipeline selected for ``family``."""
    obj = getattr(pipeline, family, None)
    caps = getattr(obj, "capabilities", None)
    if caps is not None:
        return frozenset(caps)
    choice = pipeline.config.choice(family)
    try:
        return pipeline.registry.load(family, choice.name).capabilities
    except Exception:  # noqa: BLE001 - a plugin object set by hand has no spec: assume no extras
        return frozenset()


def bind_attention(
    pipeline: Any, n_heads: int, n_kv_heads: int, hf_config: Mapping[str, Any] | None = None
) -> AttentionCall:
    caps = plugin_capabilities(pipeline, "attention")
    if hf_config is not None:
        pipeline.attention.configure(hf_config)
    return AttentionCall(pipeline.attention, n_heads // n_kv_heads, "gqa" in caps, "recurrent" in caps)


# --- model base --------------------------------------------------------------------------------


class RunLock:
    """Serialises the runs of one model that use its runtime state: the KV cache, the captured
    graphs, the batch layout of packed weights, the scheduler's queue and the monitor.

    :func:`dsr1.generation.generate` holds it for the whole call (with ``stream=True``, while the
    stream is read); a causal LM's ``forward`` holds it too (a generate may be repacking its linear
    layers). Not re-entrant for ``generate``: a second generate from the thread that runs one (a
    ``dsr1_step_finished`` hook, or a ``stream=True`` iterator not read to the end) would overwrite
    the state the first still uses, so it is a one-line error rather than a deadlock or wrong text.
    A copy of the model (``copy.deepcopy``, pickle) gets a lock of its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # plain, not RLock: a stream dropped in another thread may release it
        self._owner: int | None = None  # thread id of the holder

    @contextmanager
    def hold(self, what: str = "generate", nested_ok: bool = False) -> Iterator[None]:
        """Hold the lock for ``what``; with ``nested_ok`` a call from the holding thread runs inside its hold."""
        me = threading.get_ident()
        if self._owner == me:  # only this thread ever sets its own id, so reading it unlocked is safe
            if not nested_ok:
                raise Dsr1Error(f"model.{what} was called while this thread is still running a generate on the same "
                                "model (from a step hook, or a stream=True iterator not read to the end); finish or "
                                "close that one first")
            yield
            return
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def __deepcopy__(self, memo: dict[int, Any]) -> RunLock:
        return RunLock()

    def __reduce__(self) -> tuple[type[RunLock], tuple[()]]:
        return (RunLock, ())


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def holds_run_lock(forward: _Fn) -> _Fn:
    """Decorate a model's ``forward`` to run under its :class:`RunLock` (also from inside a generate's
    own thread, e.g. a step hook: a plain forward touches no cache)."""

    @functools.wraps(forward)
    def run(self: Dsr1Model, *args: Any, **kwargs: Any) -> Any:
        with self.run_lock.hold("forward", nested_ok=True):
            return forward(self, *args, **kwargs)

    return run  # type: ignore[return-value]  # same signature as forward


@dataclass(eq=False)
class ModelRuntime:
    """Everything a built model runs with besides its weights, in one typed place.

    The model is a torch module; what generation needs around it (the resolved plugins, the
    graph pass's step functions, the tokenizer, the checkpoint's defaults, the lock that
    serialises runs) lives here instead of in attributes bolted onto the module after build.
    :func:`~dsr1.models.loading.finish_model` binds it (``pipeline`` and ``steps``); the loader
    that read a checkpoint dir fills ``source_dir``, ``tokenizer`` and ``generation_defaults``.
    The engine reads only this object.
    """

    #: the resolved plugin objects (:class:`dsr1.pipeline.Pipeline`).
    pipeline: Any
    #: the graph pass's step functions (empty: the model's eager ``forward_step``).
    steps: GraphSteps = field(default_factory=GraphSteps)
    #: the ``preprocess`` plugin's tokenizer of the checkpoint (None: ids only).
    tokenizer: Any = None
    #: the checkpoint dir the weights came from (None: built from memory); its tokenizer files are
    #: copied by ``save_pretrained``.
    source_dir: Path | None = None
    #: ``eos_token_id`` (a list) and ``pad_token_id`` from ``generation_config.json`` / ``config.json``.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    #: serialises the runs that use the KV cache, captured graphs and weight layout (:class:`RunLock`).
    run_lock: RunLock = field(default_factory=RunLock)
    #: the device the model computes on when its weights are spread over several (the ``tiered``
    #: pool's embedding on the CPU); None: where its first parameter is.
    compute_device: torch.device | None = None
    #: the pool's placement plan (``dsr1.pool.plan.TierPlan``) when it streams weights in per step;
    #: the runners then run eagerly (a captured graph cannot follow the per-layer copies).
    placement: Any = None


class Dsr1Model(nn.Module):
    """Base of dsr1 models: ``config`` (the HF config dict), ``runtime`` and ``save_pretrained``.

    ``runtime`` (:class:`ModelRuntime`) is bound once by the builder (:meth:`bind_runtime`);
    ``pipeline``, ``tokenizer``, ``source_dir``, ``generation_defaults`` and ``run_lock`` are
    read-only views of it, the names transformers users and older code know.
    """

    config: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self._runtime: ModelRuntime | None = None

    def bind_runtime(self, runtime: ModelRuntime) -> ModelRuntime:
        """Give the model its runtime (the builder does this once, in ``finish_model``)."""
        self._runtime = runtime
        return runtime

    @property
    def runtime(self) -> ModelRuntime:
        if self._runtime is None:  # AttributeError: getattr(model, "pipeline", None) keeps working
            raise AttributeError(f"{type(self).__name__} has no runtime yet: models are built through a "
                                 "ModelBuilder (AutoModel.from_pretrained), which binds one")
        return self._runtime

    @property
    def pipeline(self) -> Any:
        return self.runtime.pipeline

    @property
    def tokenizer(self) -> Any:
        return self.runtime.tokenizer

    @property
    def source_dir(self) -> Path | None:
        return self.runtime.source_dir

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return self.runtime.generation_defaults

    @property
    def run_lock(self) -> RunLock:
        return self.runtime.run_lock

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors under their transformers names (fused weights split again)."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files), atomically."""
        from dsr1.models.loading import save_pretrained

        return save_pretrained(self, Path(save_directory))

    @property
    def device(self) -> torch.device:
        if self._runtime is not None and self._runtime.compute_device is not None:
            return self._runtime.compute_device
        return next(self.parameters()).device

    @property
    def streams_weights(self) -> bool:
        """True when a pool moves weights or activations from Python hooks each step: units
        streamed in, modules run on the CPU (no captured or compiled steps then)."""
        plan = self._runtime.placement if self._runtime is not None else None
        return plan is not None and plan.hooked

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype


class CausalLM(Dsr1Model):
    """Base of decoder-only models: the surface the engine's runners drive.

    Subclasses implement :meth:`forward_step` (and :meth:`decode_static` for graph
    ``cudagraph``) and set ``args``, ``context_length``, ``cache_shape`` and ``min_window``.
    """

    #: the architecture's shape record (``vocab_size``, ``n_layers``, ``n_kv_heads``, ``head_dim``...).
    args: Any
    context_length: int
    rope: RotaryEmbedding
    #: smallest sliding window of any layer (``None``: no sliding-window layer).
    min_window: int | None = None
    #: the attention plugin decodes from fixed-size states (linear attention), not per-token K/V.
    recurrent: bool = False
    #: the fused fast path (False: the reference layers, module for module as transformers).
    fused: bool = True
    #: this rank's pipeline stage (``parallel.pipeline`` > 1): the model holds its layers only, and
    #: :meth:`forward_step` receives and sends hidden states (:mod:`dsr1.parallel.pipeline`).
    stage: PipelineStage | None = None

    @property
    def streams_weights(self) -> bool:
        # a pipeline stage moves activations between ranks from Python each step: no captured graph either
        return self.stage is not None or super().streams_weights

    @property
    def compiled_step(self) -> Callable[..., torch.Tensor] | None:
        """The graph pass's replacement for :meth:`forward_step` (None: eager)."""
        return self.runtime.steps.decode_step

    @property
    def decode_graphs(self) -> Any:
        """The graph pass's static decode steps (:class:`dsr1.graph.cudagraph.DecodeGraphs`), or None."""
        return self.runtime.steps.decode_graphs

    @property
    def compile_kwargs(self) -> dict[str, Any] | None:
        """The ``torch.compile`` arguments the graph pass used, or None."""
        return self.runtime.steps.compile_kwargs

    def cache_shape(self, batch_size: int, max_len: int) -> Any:
        raise NotImplementedError

    def prepare_batch(self, batch_size: int, switch: bool = True) -> None:
        """Called before a generate of ``batch_size`` rows (a model may relayout its weights for it);
        ``switch=False``: a compiled decode step runs, so no layout that follows the batch size."""

    def forward_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        start: int | torch.Tensor,
        cache: Any,
        mask: torch.Tensor | None,
        window_mask: torch.Tensor | None,
        last_only: bool | torch.Tensor,
    ) -> torch.Tensor:
        """One forward over ``input_ids`` ``(B, T)`` at cache slots ``[start, start+T)``: logits of the last
        token of each row ``(B, V)`` when ``last_only``, of every token ``(B, T, V)`` when not; a ``(R,)``
        index tensor picks ``R`` tokens of the single packed row (the engine's packed prefill) → ``(R, V)``.

        This is the transformers layout (``model.embed_tokens`` → ``model.layers``, each called as
        ``layer(x, cos, sin, (mask, window_mask), cache, start)`` → ``model.norm`` → ``lm_head``, rope in
        ``rope``; ``fused`` picks the signed sine table); a model laid out otherwise overrides it.
        A pipeline stage runs its part and every rank returns the last stage's logits."""
        if self.stage is not None:
            return pipelined_step(self, self.stage, input_ids, positions, start, cache, mask, window_mask, last_only)
        x = self.embed(input_ids)  # (B, T, C)
        x = self.forward_layers(x, positions, start, cache, mask, window_mask)
        return self.forward_head(x, last_only)  # (B, V) or (B, T, V)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` → hidden states ``(B, T, C)``."""
        return self.model.embed_tokens(input_ids)

    def forward_layers(
        self, x: torch.Tensor, positions: torch.Tensor, start: int | torch.Tensor, cache: Any,
        mask: torch.Tensor | None, window_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Every layer this model holds over hidden states ``(B, T, C)``."""
        cos, sin = self.rope(positions, signed=self.fused)  # (B, T, 1, D)
        masks = (mask, window_mask)
        for layer in self.model.layers:
            x = layer(x, cos, sin, masks, cache, start)
        return x

    def forward_head(self, x: torch.Tensor, last_only: bool | torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, T, C)`` → logits of the tokens ``last_only`` picks (see :meth:`forward_step`)."""
        if isinstance(last_only, torch.Tensor):
            x = x[0, last_only]  # (R, C)
        elif last_only:
            x = x[:, -1]  # (B, C)
        return self.lm_head(self.model.norm(x))  # (B, V) or (B, T, V)

    def decode_static(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, key_valid: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """One decode step with static shapes only (what a CUDA graph captures).

        ``input_ids``/``positions`` ``(B, 1)``; ``slot`` ``(1,)`` the cache slot this token
        takes; ``key_valid`` ``(B, Tcap)`` False at prompt padding. Attention runs over the
        whole preallocated cache with slots after ``slot`` masked. Returns logits ``(B, V)``.
        """
        slots = torch.arange(key_valid.shape[1], device=key_valid.device)  # (Tcap,)
        seen = key_valid & (slots <= slot)  # (B, Tcap)
        window_mask = None
        if self.min_window is not None:
            window_mask = (seen & (slots > slot - self.min_window))[:, None, None, :]  # (B, 1, 1, Tcap)
        return self.forward_step(input_ids, positions, slot, cache, seen[:, None, None, :], window_mask, True)  # type: ignore[arg-type]

    @holds_run_lock  # a generate in another thread may be repacking the linear layers
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits of every position ``(B, T, V)``, without a cache (like transformers' ``model(**inputs)``)."""
        input_ids = _as_ids(input_ids)
        b, t = input_ids.shape
        self.rope.ensure(t, self.dtype)
        mask = window_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens 0..
            if not bool(attention_mask.all()):
                key_valid = attention_mask.bool()
                mask = build_mask(key_valid, t, 0)
                if self.min_window is not None:
                    window_mask = build_mask(key_valid, t, 0, self.min_window)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        if window_mask is None and self.min_window is not None and t > self.min_window:
            window_mask = build_mask(torch.ones(b, t, dtype=torch.bool, device=input_ids.device), t, 0, self.min_window)
        logits = self.forward_step(input_ids, position_ids, 0, None, mask, window_mask, last_only=False)
        return CausalLMOutput(logits=logits)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Generate like transformers' ``generate``; see :func:`dsr1.generation.generate`."""
        from dsr1.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)


def _as_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise Dsr1Error(f"empty prompt: input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    return input_ids
