"""Pool conformance: a pool places weights anywhere, and the model computes exactly as with ``single``.

A pool (:class:`dsr1.interfaces.Pool`) decides where a model's weights live (the device, pinned
host memory, disk streamed in per layer); it must never change what the model computes. The kit
writes a small random llama (:data:`CHECKPOINT`: large enough that its weights stand out from the
process's own memory noise), loads it with the pool under test (``name`` + ``options``) and checks:

* **outputs**: the logits of every real token of a left-padded batch equal the builtin
  ``single`` pool's within the device tolerance of the dtype
  (:data:`~dsr1_sdk.testing.tolerances.DEVICE_TOLERANCES`), and greedy generation gives exactly
  the same tokens;
* **budgets**: the peak memory the load adds stays within the caller's budget (bytes), and the
  peak during a generate within the budget + a stated activation margin. The measure is the
  device allocator's peak (``"device"``: CUDA's ``max_memory_allocated``) or the process's peak
  resident set (``"rss"``: Linux ``VmHWM``, reset through ``/proc/self/clear_refs``); by
  default the device's own (CUDA: ``device``, CPU: ``rss``). Measured in a fresh interpreter
  (spawned), so what ran before in the caller's process does not count: glibc serves a buffer
  from a free hole of its heap before it maps a new one, and keeps a freed hole resident, so in
  a heap that earlier work (a test suite) left fragmented the load's freed buffers stayed
  resident and the peak depended on what had run before;
* **refusal**: options that cannot fit (a budget smaller than one layer) are refused at load
  with a one-line :class:`~dsr1.errors.Dsr1Error` naming what does not fit and its size;
* **swap policy**: ``kv_swap`` returns ``None`` or a :class:`~dsr1.interfaces.SwapPolicy` with
  ``host_bytes >= 0``, a ``should_swap`` that returns a ``bool``, and ``pin`` only where CUDA is.

Two ways in: subclass :class:`PoolConformance` (the pytest kit, like every family's), or call a
:class:`PoolKit` (one pool choice, plain methods) from a parametrized test or a benchmark.
:func:`peak_rss_bytes` / :func:`reset_peak_rss` are public for benchmarks too.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import ctypes.util
import functools
import gc
import json
import multiprocessing
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch

from dsr1.errors import Dsr1Error
from dsr1.interfaces import SwapPolicy
from dsr1_sdk.testing.base import PluginConformance
from dsr1_sdk.testing.pruning_models import CONFIGS, _shapes
from dsr1_sdk.testing.tiny_runs import MASK, PROMPTS
from dsr1_sdk.testing.tolerances import DEVICE_TOLERANCES, DTYPES, close_problem, dtype_name

Measure = Literal["device", "rss"]

#: The kit's llama: 4 layers of 12 MiB in fp32 (embedding and head 4 MiB each), so a pool that
#: keeps a layer too many shows above the allocator's and the interpreter's own noise.
CHECKPOINT: dict[str, Any] = {
    **CONFIGS["llama"], "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 2048,
    "max_position_embeddings": 128,
}

#: Token counts ``should_swap`` is asked about.
SWAP_TOKENS: tuple[int, ...] = (0, 1, 16, 256, 4096, 1 << 20)

#: What a refusal must name: something that does not fit, and a size with its unit.
_WHAT = re.compile(r"\blayers?\b|layers\.\d+|lm_head|embed", re.IGNORECASE)
_SIZE = re.compile(r"\d(\.\d+)?\s*(B|bytes|[KMGT]i?B)\b", re.IGNORECASE)


# --- memory measures ------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    raise OSError(f"/proc/self/status has no {key} line")


def current_rss_bytes() -> int:
    """The process's resident set now (Linux ``VmRSS``)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The process's peak resident set since start or the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> str | None:
    """Reset the peak resident set to the current one (``echo 5 > /proc/self/clear_refs``, Linux 4.0+).

    Returns ``None`` when it was reset, else the reason it cannot be (not Linux, a read-only
    ``/proc``, an older kernel) for the caller to report and skip on."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        rss, hwm = current_rss_bytes(), peak_rss_bytes()
    except OSError as err:
        return f"cannot reset the peak RSS: writing 5 to /proc/self/clear_refs failed ({err})"
    if hwm > rss + (8 << 20):  # the write was accepted but ignored: VmHWM still holds an older peak
        return f"writing 5 to /proc/self/clear_refs did not reset VmHWM ({hwm} B, RSS {rss} B): kernel older than 4.0?"
    return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so a baseline counts only what is live."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc only; elsewhere freed pages may stay resident and the measure reads low
        trim(0)


def measure_problem(measure: Measure, device: torch.device) -> str | None:
    """Why ``measure`` cannot be taken for ``device`` here (``None``: it can). Probing ``rss`` resets the peak."""
    if measure == "device":
        if device.type != "cuda":
            return f"no device allocator peak for {device.type!r}: only CUDA's is measured (use measure='rss')"
        return None if torch.cuda.is_available() else "measure 'device' needs CUDA, which is not available"
    try:
        current_rss_bytes()
    except OSError as err:
        return f"no peak RSS on this system ({err})"
    return reset_peak_rss()


class PeakMemory:
    """Peak bytes in use above a baseline, by one measure; :meth:`start` takes the baseline."""

    def __init__(self, measure: Measure, device: torch.device) -> None:
        self.measure, self.device, self.baseline = measure, device, 0

    def _now(self) -> int:
        if self.measure == "device":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()

    def start(self) -> None:
        """Baseline := what is in use now (freed memory released first); the peak starts there."""
        release_freed_memory()
        if self.measure == "device":
            torch.cuda.empty_cache()
        self.baseline = self._now()
        self.restart_peak()

    def restart_peak(self) -> None:
        """Forget the peak so far (the baseline stays): the next :meth:`peak` covers what follows."""
        if self.measure == "device":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            problem = reset_peak_rss()
            assert problem is None, problem

    def settled(self) -> int:
        """What is in use now, above the baseline."""
        return self._now() - self.baseline

    def peak(self) -> int:
        """The peak since the last (re)start, above the baseline."""
        if self.measure == "device":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return peak_rss_bytes() - self.baseline


# --- the checkpoint and the runs -----------------------------------------------------------


def checkpoint_bytes(dtype: str = "float32") -> tuple[int, int]:
    """``(all weights, the largest decoder layer)`` of :data:`CHECKPOINT` in ``dtype``, in bytes:
    for choosing budgets (and options) relative to the kit's model without writing it."""
    size = _torch_dtype(dtype).itemsize
    shapes = _shapes("llama", CHECKPOINT)
    numel = {name: int(torch.Size(shape).numel()) for name, shape in shapes.items()}
    layers: dict[str, int] = {}
    for name, n in numel.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            layers[m.group(1)] = layers.get(m.group(1), 0) + n
    return sum(numel.values()) * size, max(layers.values()) * size


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write :data:`CHECKPOINT` with random weights (config.json + model.safetensors) into ``directory``."""
    from dsr1.models.loading import write_safetensors

    directory.mkdir(parents=True, exist_ok=True)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in sorted(_shapes("llama", CHECKPOINT).items()):
            gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
            if "norm" in name and name.endswith("weight"):
                yield name, 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:  # small enough that 4 layers of width 512 keep the logits O(1)
                yield name, torch.randn(shape, generator=gen) * (0.02 if "embed" in name else 0.05)

    (directory / "config.json").write_text(json.dumps(CHECKPOINT, indent=2), encoding="utf-8")
    write_safetensors(directory / "model.safetensors", tensors(), {"format": "pt"})
    return directory


@functools.cache
def shared_checkpoint() -> Path:
    """:func:`write_checkpoint` once per process, removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="dsr1-pool-kit-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_checkpoint(root / "llama")


def _torch_dtype(dtype: str) -> torch.dtype:
    value = DTYPES.get(dtype, getattr(torch, dtype, None))
    if not isinstance(value, torch.dtype):
        raise Dsr1Error(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return value


def load(model_dir: Path, name: str, options: dict[str, Any], device: str, dtype: str) -> Any:
    """The kit's model with pool ``name`` (its ``options``) on ``device`` in ``dtype``."""
    from dsr1.auto import AutoModel

    config: dict[str, Any] = {"device": device, "attention": "sdpa", "pool": {"name": name, "options": options}}
    return AutoModel.from_pretrained(model_dir, config, dtype=dtype)


def generate(model: Any, device: str, new: int) -> torch.Tensor:
    """Greedy generation of the left-padded :data:`~dsr1_sdk.testing.tiny_runs.PROMPTS` ``(2, 7 + new)``."""
    with torch.inference_mode():
        out = model.generate(PROMPTS.to(device), attention_mask=MASK.to(device), max_new_tokens=new,
                             ignore_eos=True, pad_token_id=0)
    return out.cpu()  # type: ignore[no-any-return]


def outputs(model: Any, device: str, new: int) -> dict[str, torch.Tensor]:
    """``logits`` of every real prompt token ``(N, V)`` and the ``greedy`` tokens, on the CPU."""
    with torch.inference_mode():
        logits = model(PROMPTS.to(device), attention_mask=MASK.to(device)).logits  # (2, 7, V)
    return {"logits": logits[MASK.to(device).bool()].cpu(), "greedy": generate(model, device, new)}  # (N, V)


@functools.lru_cache(maxsize=4)
def _single_outputs(model_dir: str, device: str, dtype: str, new: int) -> dict[str, torch.Tensor]:
    model = load(Path(model_dir), "single", {}, device, dtype)
    return outputs(model, device, new)


# --- the checks ----------------------------------------------------------------------------


def check_same_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str, where: str) -> None:
    """Logits within the dtype's device tolerance of ``single``'s; greedy tokens identical."""
    atol, rtol = DEVICE_TOLERANCES.get(dtype_name(_torch_dtype(dtype)), DEVICE_TOLERANCES["fp32"])
    problem = close_problem(got["logits"], want["logits"], atol, rtol, f"{where}: logits of the real prompt tokens")
    assert problem is None, problem + " (pool 'single' gives the expected ones; a pool must not change the weights)"
    g, w = got["greedy"], want["greedy"]
    assert g.shape == w.shape, f"{where}: greedy output shape {tuple(g.shape)}, 'single' {tuple(w.shape)}"
    diff = (g != w).nonzero()
    assert diff.numel() == 0, (
        f"{where}: greedy tokens differ from pool 'single' first at row {int(diff[0, 0])}, position "
        f"{int(diff[0, 1])}: {int(g[diff[0, 0], diff[0, 1]])} != {int(w[diff[0, 0], diff[0, 1]])}"
    )


def check_within(peak: int, budget: int, where: str) -> None:
    assert peak <= budget, f"{where}: peak {peak} B ({peak / 2**20:.1f} MiB) exceeds the budget {budget} B " \
                           f"({budget / 2**20:.1f} MiB) by {peak - budget} B"


def check_refusal(error: BaseException | None, where: str) -> str:
    """A plan that cannot fit raised a one-line ``Dsr1Error`` naming what does not fit and a size."""
    assert error is not None, f"{where}: the load succeeded; options that cannot fit must raise dsr1.errors.Dsr1Error"
    assert isinstance(error, Dsr1Error), (
        f"{where}: raised {type(error).__name__}: {error}; refuse a plan that cannot fit with a Dsr1Error, "
        "before allocating"
    )
    message = str(error).strip()
    assert message and "\n" not in message, f"{where}: the error must be one line, got {message!r}"
    assert _WHAT.search(message) and _SIZE.search(message), (
        f"{where}: the error {message!r} must name what does not fit (a layer, 'layers.N', 'lm_head', "
        "'embed_tokens') and its size with a unit (e.g. '12.0 MiB')"
    )
    return message


def check_swap_policy(policy: Any, where: str) -> None:
    """``None``, or a SwapPolicy with ``host_bytes >= 0``, a bool-valued ``should_swap``, a sound ``pin``."""
    if policy is None:
        return
    assert isinstance(policy, SwapPolicy), (
        f"{where}: kv_swap returned {type(policy).__name__}; return None or a dsr1.interfaces.SwapPolicy"
    )
    hb = policy.host_bytes
    assert isinstance(hb, int) and not isinstance(hb, bool) and hb >= 0, (
        f"{where}: host_bytes {hb!r} is not an int >= 0"
    )
    assert callable(policy.should_swap), f"{where}: should_swap {policy.should_swap!r} is not callable"
    for n in SWAP_TOKENS:
        answer = policy.should_swap(n)
        assert isinstance(answer, bool), (
            f"{where}: should_swap({n}) returned {answer!r} ({type(answer).__name__}); return a Python bool"
        )
    assert isinstance(policy.pin, bool), f"{where}: pin {policy.pin!r} is not a bool"
    assert not policy.pin or torch.cuda.is_available(), f"{where}: pin=True, but pinned memory needs CUDA (absent)"


@dataclass
class Peaks:
    """What :meth:`PoolKit.check_budget` measured, in bytes above the baseline before the load."""

    measure: str
    #: peak while loading and placing the weights.
    weights: int
    #: in use once the load returned (garbage collected): what the placement keeps.
    settled: int
    #: peak during a generate.
    generate: int


class PoolKit:
    """The pool checks for one pool choice, as plain methods (each raises AssertionError when it fails).

    :param name: the pool's name (``pool: {name: ...}``).
    :param options: its options.
    :param device: torch device type the model computes on (``cpu``, ``cuda``).
    :param dtype: the model's dtype (``float32``, ``bfloat16`` ...), which picks the tolerance.
    :param model_dir: the checkpoint (default: :data:`CHECKPOINT`, written once per process).
    :param new_tokens: greedy tokens generated per run.
    """

    def __init__(self, name: str, options: dict[str, Any] | None = None, *, device: str = "cpu",
                 dtype: str = "float32", model_dir: Path | None = None, new_tokens: int = 8) -> None:
        self.name, self.options = name, dict(options or {})
        self.device, self.dtype, self.new_tokens = device, dtype, new_tokens
        self.model_dir = model_dir if model_dir is not None else shared_checkpoint()
        self.where = f"pool {name!r} {self.options} on {device}/{dtype}"

    def load(self, options: dict[str, Any] | None = None) -> Any:
        """The checkpoint loaded with this pool (``options`` replace the kit's)."""
        return load(self.model_dir, self.name, self.options if options is None else options, self.device, self.dtype)

    def reference(self) -> dict[str, torch.Tensor]:
        """``single``'s :func:`outputs` on the same checkpoint, device and dtype (once per process)."""
        cached = _single_outputs(str(self.model_dir), self.device, self.dtype, self.new_tokens)
        return {k: v.clone() for k, v in cached.items()}

    def check_outputs(self) -> None:
        """Same logits (within tolerance) and the same greedy tokens as ``single``."""
        want = self.reference()
        check_same_outputs(outputs(self.load(), self.device, self.new_tokens), want, self.dtype, self.where)

    def check_budget(self, budget_bytes: int, margin_bytes: int = 0, measure: Measure | None = None) -> Peaks:
        """Load, then generate: the peak the load adds stays within ``budget_bytes``, the peak during
        the generate within ``budget_bytes + margin_bytes`` (activations, KV cache, logits).

        ``measure`` defaults to the device's own: ``device`` on CUDA, ``rss`` elsewhere. Skips
        (pytest) with the reason when the measure cannot be taken here. Runs in a spawned
        interpreter (see the module docstring), which imports the caller's ``__main__`` module
        again, as every ``spawn`` does: a script calling this keeps its work under
        ``if __name__ == "__main__":``."""
        measure = measure or ("device" if self.device == "cuda" else "rss")
        problem = measure_problem(measure, torch.device(self.device))
        if problem:
            pytest.skip(f"{self.where}: budget not checked: {problem}")
        args = (self.name, self.options, self.device, self.dtype, str(self.model_dir), self.new_tokens,
                budget_bytes, margin_bytes, measure)
        # a fresh process per check: its heap holds nothing that the caller's history left behind
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as fresh:
            return fresh.submit(_check_budget_fresh, *args).result()

    def _check_budget_here(self, budget_bytes: int, margin_bytes: int, measure: Measure) -> Peaks:
        """:meth:`check_budget` in this process (what the spawned one runs)."""
        device = torch.device(self.device)
        self.reference()  # warms the process up (imports, thread pools, kernels): not the pool's memory
        meter = PeakMemory(measure, device)
        meter.start()
        model = self.load()
        weights = meter.peak()
        release_freed_memory()
        settled = meter.settled()
        meter.restart_peak()
        generate(model, self.device, self.new_tokens)
        during = meter.peak()
        del model
        peaks = Peaks(measure, weights, settled, during)
        check_within(weights, budget_bytes, f"{self.where}: {measure} peak while placing the weights "
                                            f"({settled} B still in use after the load)")
        check_within(during, budget_bytes + margin_bytes, f"{self.where}: {measure} peak during generate "
                                                          f"(budget + margin {margin_bytes} B)")
        return peaks

    def check_unfit(self, options: dict[str, Any]) -> str:
        """``options`` cannot fit: the load raises a clear one-line Dsr1Error; returns its message."""
        error: BaseException | None = None
        try:
            self.load(options)
        except Exception as err:  # noqa: BLE001 - any other exception is reported as the wrong kind
            error = err
        return check_refusal(error, f"pool {self.name!r} with options {options} that cannot fit")

    def check_kv_swap(self) -> SwapPolicy | None:
        """Ask the placed pool ``kv_swap`` (as the engine does when it sizes the KV pool) and check the answer."""
        model = self.load()
        c = CHECKPOINT
        kv_bytes_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] \
            * _torch_dtype(self.dtype).itemsize
        policy = model.pipeline.pool.kv_swap(kv_bytes_per_token, torch.device(self.device))
        check_swap_policy(policy, f"{self.where}: kv_swap")
        return policy  # type: ignore[no-any-return]


def _check_budget_fresh(name: str, options: dict[str, Any], device: str, dtype: str, model_dir: str,
                        new_tokens: int, budget_bytes: int, margin_bytes: int, measure: Measure) -> Peaks:
    kit = PoolKit(name, options, device=device, dtype=dtype, model_dir=Path(model_dir), new_tokens=new_tokens)
    return kit._check_budget_here(budget_bytes, margin_bytes, measure)


class PoolConformance(PluginConformance):
    """Conformance kit of the ``pool`` family. Subclass it and set ``plugin`` (and ``options``).

    ``weight_budget_bytes``: the budget the weights must stay within (None: not checked), with
    ``activation_margin_bytes`` more allowed during a generate, by ``budget_measure`` (None: the
    device's own). ``unfit_options``: options that cannot fit (None: not checked). Size them from
    :func:`checkpoint_bytes`."""

    family: ClassVar[str] = "pool"
    dtype: ClassVar[str] = "float32"
    new_tokens: ClassVar[int] = 8
    weight_budget_bytes: ClassVar[int | None] = None
    activation_margin_bytes: ClassVar[int] = 16 << 20
    budget_measure: ClassVar[Measure | None] = None
    unfit_options: ClassVar[dict[str, Any] | None] = None

    def kit(self) -> PoolKit:
        self.skip_unless_runs_here(self.make_impl(), _torch_dtype(self.dtype))
        return PoolKit(self.plugin, self.options, device=self.target_device(), dtype=self.dtype,
                       new_tokens=self.new_tokens)

    def test_same_logits_and_tokens_as_single(self) -> None:
        self.kit().check_outputs()

    def test_weights_and_generate_within_budget(self) -> None:
        if self.weight_budget_bytes is None:
            pytest.skip("set weight_budget_bytes (and activation_margin_bytes) to check the pool's budget")
        self.kit().check_budget(self.weight_budget_bytes, self.activation_margin_bytes, self.budget_measure)

    def test_unfit_plan_is_a_clear_error(self) -> None:
        if self.unfit_options is None:
            pytest.skip("set unfit_options (options that cannot fit) to check the refusal")
        self.kit().check_unfit(self.unfit_options)

    def test_kv_swap_policy(self) -> None:
        self.kit().check_kv_swap()
