"""Issue 15: decode with the weights spread over GPU memory, pinned host memory and disk (pool
``tiered``), against the same checkpoint all on the GPU (pool ``single``) and accelerate's
``device_map="auto"``, in one process.

    python -m dsr1.benchmarks.tiered --shape qwen2-7b --work-dir /tmp/tiered --compare accelerate \\
        --budgets 1.0,0.5,0.25 --batch-size 1,16 --disk-row 0.25,0.25 --output OUT.json
    python -m dsr1.benchmarks.tiered --device cpu --shape tiny-125m --work-dir /tmp/tiered --budgets 1.0,0.5 \\
        --batch-size 1 --compare accelerate --output OUT.json

It writes (or reuses) a random bf16 checkpoint of ``--shape`` (a built-in shape, or ``dsr1-tiny``'s
config) as safetensors under ``--work-dir``. Each budget of ``--budgets`` is a fraction of the
weights' bytes in the compute dtype (``--dtype``) given to the pool as ``gpu_memory_gb``
(``cpu_memory_gb`` on ``--device cpu``, where what the budget cannot hold streams from disk); 1.0
holds everything, so it is the like-for-like check against ``single``. ``--disk-row G,C`` adds a
row whose host memory is budgeted too (``C`` of the weights), so part of them stream from disk.
``--cpu-layers F,...`` adds rows at those GPU budgets with ``device: [cuda, cpu]``, where the cost
model may run layers on the CPU instead of streaming them; each is compared with the budget row
of the same fraction in the same run (and, through it, with accelerate).
Every run is graph ``eager`` (streaming needs it; ``single`` runs eager too, so the ratio compares
placement alone), greedy, after a warm-up; decode tok/s = B·(N−1) / (t(N) − t(1)) over medians (:mod:`dsr1.benchmarks.rates`), beside the
plan's floor (B / ``TierPlan.floor_s()``: streamed bytes over the measured host→device and disk
bandwidths plus resident bytes over the device's). Below 1.0, accelerate gets ``max_memory`` of
the same bytes (the rest in host memory, or in ``offload_folder`` for the disk row and on the
CPU) and is timed by the same protocol around ``model.generate``.

Memory during the timed decode: on CUDA the allocator's peak; on the CPU the process's peak
resident set (``VmHWM`` after writing ``5`` to ``/proc/self/clear_refs``; ``ru_maxrss`` where that
cannot be written, which also counts the load), also less the resident set before the load,
against the budget. The pool evicts a disk unit's pages after every read (the page cache is host
memory too), so a disk row reads cold, as its floor assumes.

The report is rewritten after every measurement, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsr1.benchmarks import common
from dsr1.benchmarks.cuda_timing import decode_rate, error_line
from dsr1.benchmarks.shapes import SHAPES, RandomWeights
from dsr1.benchmarks.tiered_report import GIB, memory_fields, ratios, table
from dsr1.errors import Dsr1Error, did_you_mean

#: the bundled checkpoint's config, accepted as a shape (its weights are not used: random ones are written).
TINY = "dsr1-tiny"
#: the warm-up before each timed row: whole generates until this many seconds have passed, at most this many.
WARMUP_S, WARMUP_CALLS = 1.0, 5


# --- the checkpoint ------------------------------------------------------------------------------


def shape_config(shape: str) -> dict[str, Any]:
    """The HF config of a built-in shape or of ``dsr1-tiny``."""
    if shape == TINY:
        from dsr1.models.loading import read_hf_config, resolve_model_dir

        return read_hf_config(resolve_model_dir(TINY, download=False))
    if shape not in SHAPES:
        raise Dsr1Error(f"unknown shape {shape!r}{did_you_mean(shape, [*SHAPES, TINY])}")
    return dict(SHAPES[shape])


def write_checkpoint(shape: str, work_dir: Path, device: str) -> tuple[Path, dict[str, Any], int]:
    """``(dir, hf config, number of weights)`` of a random bf16 checkpoint of ``shape`` under ``work_dir``;
    reused when a complete one is there (``config.json`` is written last and must match)."""
    import torch

    from dsr1.models.deepseek import DeepseekArgs
    from dsr1.models.llama import LlamaArgs
    from dsr1.models.loading import write_safetensors

    hf = {**shape_config(shape), "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    args = DeepseekArgs if str(hf["model_type"]).startswith("deepseek") else LlamaArgs
    shapes = args.from_hf(hf).hf_tensor_shapes()
    numel = sum(math.prod(s) for s in shapes.values())
    directory = work_dir / f"{shape}-bf16"
    config, weights = directory / "config.json", directory / "model.safetensors"
    try:
        reusable = json.loads(config.read_text()) == hf and weights.stat().st_size > 2 * numel
    except (OSError, ValueError):
        reusable = False
    if reusable:
        return directory, hf, numel
    directory.mkdir(parents=True, exist_ok=True)
    config.unlink(missing_ok=True)
    # generated where the model computes (a GPU draws 15 GB of normals in seconds), written from there
    reader = RandomWeights(shapes, torch.bfloat16, torch.device(device))
    tmp = weights.with_name(".model.safetensors.tmp")
    write_safetensors(tmp, ((n, reader.tensor(n)) for n in sorted(shapes)), {"format": "pt"})
    tmp.replace(weights)
    config.write_text(json.dumps(hf, indent=2) + "\n")
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory, hf, numel


# --- loading -------------------------------------------------------------------------------------


def gb(nbytes: float) -> float:
    """A budget in GiB for ``nbytes``, a page over, so the float figure converts back to no fewer bytes."""
    return (nbytes + 4096) / GIB


def tiered_options(device: str, fraction: float, nbytes: int, work_dir: Path, cpu_fraction: float | None,
                   bandwidth: dict[str, float]) -> dict[str, Any]:
    key = "cpu_memory_gb" if device == "cpu" else "gpu_memory_gb"
    options: dict[str, Any] = {key: gb(fraction * nbytes), "disk_dir": str(work_dir / "offload")}
    if cpu_fraction is not None:
        options["cpu_memory_gb"] = gb(cpu_fraction * nbytes)
    if bandwidth:
        options["bandwidth_gbps"] = dict(bandwidth)
    return options


def load_dsr1(model_dir: Path, device: str | list[str], dtype: str, pool: str,
              options: dict[str, Any]) -> tuple[Any, Callable[..., Any]]:
    from dsr1.auto import AutoModel

    config = {"device": device, "graph": "eager", "pool": {"name": pool, "options": options}}
    model = AutoModel.from_pretrained(model_dir, config, dtype=dtype)

    def gen(ids: Any, mask: Any, new: int) -> Any:
        return model.generate(ids, mask, max_new_tokens=new, ignore_eos=True)

    return model, gen


def accelerate_problem() -> str | None:
    """Why the accelerate comparison cannot run here (None: it can)."""
    try:
        import accelerate  # noqa: F401 - only whether it imports
        import transformers  # noqa: F401
    except ImportError as err:
        return f"accelerate comparison skipped: {err} (pip install accelerate)"
    return None


def load_accelerate(model_dir: Path, dtype: str, max_memory: dict[Any, int],
                    offload: Path) -> tuple[Any, Callable[..., Any]]:
    """transformers' model of the checkpoint placed by accelerate within ``max_memory``, and its greedy generate."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), device_map="auto", max_memory=max_memory,
        offload_folder=str(offload))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def gen(ids: Any, mask: Any, new: int) -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)

    return model, gen


def device_map_counts(model: Any) -> dict[str, int]:
    """How many of accelerate's placed modules sit on each device (``{"0": 20, "cpu": 10}``)."""
    counts: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {"": "all on one device"}).values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def release() -> None:
    """After the caller dropped a model: collect its cycles (the streamer's hooks), return the
    freed heap and CUDA cache."""
    import torch

    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc: freed pages leave the resident set, so the next baseline is what is live
        trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- measuring -----------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key} line")


def rss_bytes() -> int | None:
    try:
        return _status_bytes("VmRSS")
    except OSError:
        return None


class DecodePeak:
    """Peak memory over a region: CUDA's allocator peak, or the CPU's peak resident set."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated"

    def __enter__(self) -> DecodePeak:  # noqa: PYI034 - never subclassed
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.method = "VmHWM after /proc/self/clear_refs"
        except OSError as err:
            self.method = f"ru_maxrss (process lifetime, load included): /proc/self/clear_refs not writable ({err})"
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def peak(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.method.startswith("VmHWM"):
            return _status_bytes("VmHWM")
        return int(common.maxrss_mb() * (1 << 20))


def measure(what: str, gen: Callable[..., Any], device: str, batch: int, prompt: int, new: int, vocab: int,
            reps: int) -> tuple[dict[str, Any], Any]:
    """Decode figures of ``gen`` at ``batch`` after a warm-up, and the tokens of its last ``new``-token call."""
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(min(100, vocab - 1), vocab, (batch, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    last: dict[int, Any] = {}

    def run(n: int) -> None:
        out = gen(ids, mask, n)
        if tuple(out.shape) != (batch, prompt + n):
            raise Dsr1Error(f"{what} generated {tuple(out.shape)}, expected {(batch, prompt + n)}")
        last[n] = out

    started = time.perf_counter()
    # warm-up: whole generates until a second has passed (the first model of a process runs its first
    # few generates slow: kernels load, the allocator grows, clocks rise), at least one
    for _ in range(WARMUP_CALLS):
        run(new)
        if time.perf_counter() - started > WARMUP_S:
            break
    warmup_s = time.perf_counter() - started
    busy = common.cpu_busy()
    with DecodePeak(device) as mem:
        got = decode_rate(what, run, batch, prompt, new, reps)
        peak = mem.peak()
    figures = {"decode_tok_s": round(got["decode_tok_s"], 2), "prefill_s": round(got["prefill_s"], 4),
               "generate_s": round(got["generate_s"], 4), "warmup_s": round(warmup_s, 2),
               "peak_bytes": peak, "peak_method": mem.method,
               "other_processes_cpu_pct": common.others_busy(busy, common.cpu_busy())}
    return figures, last[new].cpu()


# --- the matrix ----------------------------------------------------------------------------------


def parse_fractions(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise Dsr1Error(f"{flag} takes comma-separated fractions of the weights (0.5,0.25), got {text!r}") from None
    if not values or min(values) <= 0:
        raise Dsr1Error(f"{flag} needs fractions > 0 of the weights' bytes, got {text!r}")
    return values


def parse_bandwidth(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise Dsr1Error(f"--bandwidth takes NAME=GB/S (disk_read=2.5), got {item!r}") from None
        if not eq:
            raise Dsr1Error(f"--bandwidth takes NAME=GB/S (disk_read=2.5), got {item!r}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.tiered", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b", help=f"a built-in shape ({', '.join(sorted(SHAPES))}) or {TINY}")
    p.add_argument("--work-dir", required=True, help="where the checkpoint and the offload files go")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda where there is one")
    p.add_argument("--budgets", default="1.0,0.5,0.25",
                   help="fractions of the weights' bytes for gpu_memory_gb (cpu_memory_gb on --device cpu); "
                        "'none': the disk row only")
    p.add_argument("--batch-size", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=2, help="pairs of 1-token and N-token generates (medians)")
    p.add_argument("--disk-row", default="0.25,0.25",
                   help="GPU,CPU fractions of a row whose host memory is budgeted too ('none': no such row; "
                        "CUDA only: on the CPU every budget row streams from disk)")
    p.add_argument("--disk-batch-size", default="1", help="batch sizes of the disk row")
    p.add_argument("--resident-pair", type=int, default=0, metavar="ROUNDS",
                   help="also load single and tiered at budget 1.0 side by side and time them in ROUNDS "
                        "alternating rounds: the like-for-like within-2%% check")
    p.add_argument("--cpu-layers", default="none",
                   help="GPU fractions of rows with device [cuda, cpu]: layers may run on the CPU (CUDA only)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="compute dtype, which the budgets are fractions of (default: bfloat16 on CUDA, float32 on "
                        "the CPU, where bf16 matmuls are slow without AVX-512 BF16; the checkpoint is bf16 either way)")
    p.add_argument("--compare", choices=["accelerate"], default=None)
    p.add_argument("--accelerate-disk", action="store_true",
                   help="also time accelerate on the disk row (its disk offload is slow: minutes for a 7B)")
    p.add_argument("--bandwidth", action="append", default=[], metavar="NAME=GB/S",
                   help="plan with this bandwidth instead of the measured one (the pool's bandwidth_gbps)")
    p.add_argument("--output")
    return p


class Run:
    """One process's matrix: the settings, the checkpoint and the report it fills (saved after every figure)."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        import torch

        self.args = args
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("python -m dsr1.benchmarks.tiered: --device cuda, but torch.cuda.is_available() is False")
        budgets = [] if args.budgets in ("", "none") else parse_fractions(args.budgets, "--budgets")
        batches = common.int_list(args.batch_size, "--batch-size")
        disk = None if args.disk_row in ("", "none") else parse_fractions(args.disk_row, "--disk-row")
        if disk is not None and len(disk) != 2:
            raise Dsr1Error(f"--disk-row takes GPU,CPU fractions (0.25,0.25), got {args.disk_row!r}")
        if args.new_tokens < 2 or args.prompt_len < 1 or args.reps < 1:
            raise Dsr1Error("--new-tokens ≥ 2, --prompt-len ≥ 1 and --reps ≥ 1 are required")
        self.bandwidth = parse_bandwidth(args.bandwidth)
        self.work = Path(args.work_dir).expanduser().resolve()
        self.dtype = args.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        cpu_layers = [] if args.cpu_layers in ("", "none") else parse_fractions(args.cpu_layers, "--cpu-layers")
        #: (name, device fraction, host fraction or None, batch sizes, layers may run on the CPU)
        self.rows: list[tuple[str, float, float | None, list[int], bool]] = [
            (f"budget {f:g}", f, None, batches, False) for f in budgets]
        skipped: dict[str, str] = {}
        if cpu_layers and self.device == "cpu":
            skipped["cpu_layers_skipped"] = "--cpu-layers runs layers on the CPU beside a GPU; this run has no GPU"
        else:
            for f in cpu_layers:  # right after the row it is compared with, so a run cut short keeps pairs
                at = next((i + 1 for i, r in enumerate(self.rows) if r[0] == f"budget {f:g}"), len(self.rows))
                self.rows.insert(at, (f"cpu layers {f:g}", f, None, batches, True))
        if disk is not None and self.device == "cpu":
            skipped["disk_row_skipped"] = "on the CPU every budget row below 1.0 already streams from disk"
        elif disk is not None:
            self.rows.append((f"disk {disk[0]:g}/{disk[1]:g}", disk[0], disk[1],
                              common.int_list(args.disk_batch_size, "--disk-batch-size"), False))
        self.accelerate_skipped = accelerate_problem() if args.compare == "accelerate" else \
            "not asked (--compare accelerate)"
        if self.accelerate_skipped:
            skipped["accelerate_skipped"] = self.accelerate_skipped
        self.model_dir, hf, numel = write_checkpoint(args.shape, self.work, self.device)
        self.nbytes = numel * getattr(torch, self.dtype).itemsize
        self.vocab = int(hf["vocab_size"])
        env = common.environment(self.device)
        self.report: dict[str, Any] = {
            "command": command, "date": env["date"],
            "hardware": torch.cuda.get_device_name(0) if self.device == "cuda" else common.cpu_model(),
            "machine": env["machine"],
            "versions": {**env["versions"], "transformers": common.version("transformers"),
                         "accelerate": common.version("accelerate")},
            "device": self.device,
            "checkpoint": {"shape": args.shape, "dir": str(self.model_dir), "dtype": "bfloat16", "bytes": numel * 2},
            "dtype": self.dtype, "weight_bytes": self.nbytes,
            "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
                         "graph": "eager", "warmup": f"whole generates for {WARMUP_S} s, at most {WARMUP_CALLS}"},
            **skipped, "single": {}, "results": [],
        }
        self.single_tokens: dict[int, Any] = {}

    def save(self) -> None:
        common.write_report(self.report, self.args.output)

    def timed(self, what: str, gen: Callable[..., Any], b: int) -> tuple[dict[str, Any], Any]:
        a = self.args
        try:
            return measure(what, gen, self.device, b, a.prompt_len, a.new_tokens, self.vocab, a.reps)
        except Exception as err:  # noqa: BLE001 - one failed measurement is a row of the report, not the end
            return {"error": error_line(err)}, None

    def single(self) -> None:
        """The baseline, at every batch size a row runs: every weight on the compute device."""
        baseline = rss_bytes()
        try:
            model, gen = load_dsr1(self.model_dir, self.device, self.dtype, "single", {})
        except Exception as err:  # noqa: BLE001
            self.report["single"] = {"error": error_line(err)}
            return
        for b in sorted({b for _, _, _, row_batches, _ in self.rows for b in row_batches}):
            figures, self.single_tokens[b] = self.timed(f"single batch {b}", gen, b)
            self.report["single"][str(b)] = {**figures, **memory_fields(self.device, figures, baseline, self.nbytes)}
            self.save()
        del model, gen
        release()

    def tiered(self, name: str, fraction: float, cpu_fraction: float | None, entries: dict[int, Any],
               host_compute: bool = False) -> None:
        import torch

        options = tiered_options(self.device, fraction, self.nbytes, self.work, cpu_fraction, self.bandwidth)
        baseline = rss_bytes()
        device = [self.device, "cpu"] if host_compute else self.device
        try:
            model, gen = load_dsr1(self.model_dir, device, self.dtype, "tiered", options)
        except Exception as err:  # noqa: BLE001 - a budget that cannot fit is a result too
            for e in entries.values():
                e["tiered"] = {"pool_options": options, "error": error_line(err)}
            self.save()
            return
        plan = model.runtime.placement
        floor_s = plan.floor_s() if plan is not None else None
        for b, e in entries.items():
            figures, tokens = self.timed(f"tiered {name} batch {b}", gen, b)
            t: dict[str, Any] = {"device": device, "pool_options": options,
                                 "plan": plan.as_dict() if plan is not None else None, **figures}
            if floor_s and "decode_tok_s" in figures:
                t["floor_tok_s"] = round(b / floor_s, 2)
                t["fraction_of_floor"] = round(figures["decode_tok_s"] / t["floor_tok_s"], 3)
            if tokens is not None and self.single_tokens.get(b) is not None:
                t["greedy_identical_to_single"] = bool(torch.equal(tokens, self.single_tokens[b]))
            e["tiered"] = {**t, **memory_fields(self.device, figures, baseline, int(fraction * self.nbytes))}
            self.save()
        del model, gen, plan
        release()

    def accelerate(self, name: str, fraction: float, cpu_fraction: float | None, entries: dict[int, Any],
                   host_compute: bool = False) -> None:
        reason = self.accelerate_skipped or ("the weights fit: single is the baseline" if fraction >= 1.0 else None)
        if not reason and host_compute:
            reason = f"the same max_memory as row 'budget {fraction:g}', timed there"
        if not reason and cpu_fraction is not None and not self.args.accelerate_disk:
            reason = "accelerate's disk offload not timed (--accelerate-disk times it)"
        if reason:
            for e in entries.values():
                e["accelerate"] = {"skipped": reason}
            return
        budget = int(fraction * self.nbytes)
        # host memory is budgeted in the disk row only; elsewhere all the machine has
        host = int(cpu_fraction * self.nbytes) if cpu_fraction is not None else \
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        max_memory: dict[Any, int] = {"cpu": budget} if self.device == "cpu" else {0: budget, "cpu": host}
        shown = {str(k): v for k, v in max_memory.items()}
        baseline = rss_bytes()
        try:
            model, gen = load_accelerate(self.model_dir, self.dtype, max_memory, self.work / "accelerate-offload")
        except Exception as err:  # noqa: BLE001
            for e in entries.values():
                e["accelerate"] = {"max_memory": shown, "error": error_line(err)}
            self.save()
            return
        placed = device_map_counts(model)
        for b, e in entries.items():
            figures, _ = self.timed(f"accelerate {name} batch {b}", gen, b)
            e["accelerate"] = {"max_memory": shown, "device_map": placed, **figures,
                               **memory_fields(self.device, figures, baseline, budget)}
            self.save()
        del model, gen
        release()

    def resident_pair(self, batches: list[int], rounds: int) -> None:
        """``single`` and ``tiered`` with a budget that holds everything, both loaded, timed in
        alternating rounds: a ratio that machine drift between rows cannot skew."""
        options = tiered_options(self.device, 1.0, self.nbytes, self.work, None, self.bandwidth)
        models = {"single": load_dsr1(self.model_dir, self.device, self.dtype, "single", {}),
                  "tiered": load_dsr1(self.model_dir, self.device, self.dtype, "tiered", options)}
        direct = getattr(models["tiered"][0].pipeline.pool, "direct", None)
        out: dict[str, Any] = {"pool_options": options, "rounds": rounds, "results": [],
                               "tiered_read_straight_to": str(direct) if direct is not None else "host memory"}
        self.report["resident_pair"] = out
        for b in batches:
            rates: dict[str, list[float]] = {name: [] for name in models}
            for r in range(rounds):
                for name in (list(models) if r % 2 == 0 else list(reversed(models))):
                    figures, _ = self.timed(f"{name} batch {b} round {r}", models[name][1], b)
                    rates[name].append(figures.get("decode_tok_s", float("nan")))
            single, tiered = statistics.median(rates["single"]), statistics.median(rates["tiered"])
            ratio = round(tiered / single, 3)
            out["results"].append({"batch_size": b, "rounds": rates, "single_decode_tok_s": single,
                                   "tiered_decode_tok_s": tiered, "ratio": ratio,
                                   "within_2pct": abs(ratio - 1) <= 0.02})
            print(f"resident pair batch {b}: single {single:.1f}, tiered {tiered:.1f} tok/s, ratio {ratio:.3f}",
                  flush=True)
            self.save()
        del models
        release()

    def all(self) -> dict[str, Any]:
        if self.args.resident_pair:
            self.resident_pair(common.int_list(self.args.batch_size, "--batch-size"), self.args.resident_pair)
        self.single()
        for name, fraction, cpu_fraction, batches, host_compute in self.rows:
            entries = {b: {"row": name, "budget_fraction": fraction, "cpu_fraction": cpu_fraction, "batch_size": b}
                       for b in batches}
            self.report["results"].extend(entries.values())
            self.tiered(name, fraction, cpu_fraction, entries, host_compute)
            self.accelerate(name, fraction, cpu_fraction, entries, host_compute)
            for b, e in entries.items():
                streaming = next((r for r in self.report["results"] if r["row"] == f"budget {fraction:g}"
                                  and r["batch_size"] == b), None) if host_compute else None
                ratios(e, self.report["single"].get(str(b), {}), streaming)
            self.save()
        return self.report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = "python -m dsr1.benchmarks.tiered " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(table(Run(args, command).all()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
