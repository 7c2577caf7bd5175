"""The pruning run: dense → stage after stage, each stage saved, measured and reported.

For each stage (:func:`plan_stages`) the *previous stage's* model is pruned further to the
stage's sparsity, optionally fine-tuned (``recover_steps``), evaluated on held-out text, saved
as ``D/stage-<sparsity>/`` and benchmarked from the saved dir. A stage dir is first written as
``D/.stage-<sparsity>.partial`` and renamed into place when complete, so an interrupt (Ctrl-C)
leaves the completed stages intact and no half-written stage; the report is rewritten after
every stage and once more on interrupt, so it always describes what is on disk.

The output dir follows the rule of :mod:`dsr1.outputs` (new, empty, or a previous ``dsr1
prune`` output with ``--overwrite``; never the model or a dir that contains it), checked before
the model is loaded. It is claimed just before the first stage: a new dir holding only the
marker is swapped in for the previous output, which is then deleted.

Sparsity targets are fractions of the dense model's prunable weights. A pruner sees the model
as it is now, so each call is given ``1 - (1 - target) · P_dense / P_now`` where ``P`` counts
prunable weight elements (equal to the target unless earlier stages removed rows physically).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsr1.benchmarks.pruning_speed import HEADLINE, causal_speed, encoder_speed
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.outputs import OutputPlan, plan_output
from dsr1.pruning import data as textdata
from dsr1.pruning.metrics import (
    census,
    dir_bytes,
    embedding_fidelity,
    original_shapes,
    perplexity,
    prunable_numel,
    sentence_embeddings,
)
from dsr1.tasks.prune.recover import recover_
from dsr1.tasks.prune.report import write_all
from dsr1.tasks.prune.schedule import PruneSettings, check_settings, is_own_output, plan_stages, stage_name
from dsr1.specs import LOAD_PRUNING_KEYS, PruningOptions

CAUSAL_TYPES = ("llama", "mistral", "qwen2")
ENCODER_TYPES = ("bert",)
#: sentence-transformers files copied into each stage of an encoder (so it loads there too).
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


def plan_output_dir(s: PruneSettings) -> OutputPlan:
    """Check ``s.output_dir`` under the rule of :mod:`dsr1.outputs` (before anything is loaded).

    The dir is new, empty or a previous ``dsr1 prune`` output (marker at its top; replaced with
    ``--overwrite``), and never the model dir, a dir that contains it, or the calibration or
    evaluation text.
    """
    inputs = [p for p in (s.model, s.calibration, s.eval_text) if p and p.strip()]
    return plan_output(Path(s.output_dir), "prune", overwrite=s.overwrite, inputs=inputs, label="output dir",
                       owns=is_own_output)


def write_stage(model: Any, out: Path, name: str, files: dict[str, bytes]) -> Path:
    """Save ``model`` (+ ``files``) as ``out/name`` atomically: a hidden partial dir, then a rename.

    ``out`` is this run's own output dir (claimed through :mod:`dsr1.outputs`), so the stage
    needs no marker of its own.
    """
    from dsr1.models.loading import write_model_dir

    final, partial = out / name, out / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        write_model_dir(model, partial)
        source: Path | None = getattr(model, "source_dir", None)
        for item in ST_FILES if source is not None else ():
            src = Path(str(source)) / item
            if src.is_dir():
                shutil.copytree(src, partial / item)
            elif src.is_file():
                shutil.copyfile(src, partial / item)
        for fname, blob in files.items():
            (partial / fname).write_bytes(blob)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def remove_partials(out: Path) -> None:
    """Delete half-written stage dirs (``.stage-*``) left by an interrupted stage."""
    for p in out.glob(".stage-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def transformers_expressible(config: dict[str, Any]) -> bool:
    """Whether transformers' config format describes these shapes (BERT has no per-head size key)."""
    if config.get("model_type") == "bert" and "head_dim" in config:
        return int(config["head_dim"]) * int(config["num_attention_heads"]) == int(config["hidden_size"])
    return True


def prune_stage(pruner: Any, model: Any, sparsity: float, calibration: list[torch.Tensor]) -> dict[str, Any]:
    """One call of the strategy (a seam for tests: interrupts are simulated here)."""
    with torch.no_grad():
        masks: dict[str, Any] = pruner.prune_(model, sparsity, calibration)
    return masks


class Progress:
    """A progress bar per stage on stderr (rich), or nothing when ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.bar: Any = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=Console(stderr=True))

    def __enter__(self) -> Progress:  # noqa: PYI034 - typing.Self needs 3.11; dsr1 supports 3.10
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, name: str, total: int) -> Callable[[str], None]:
        """A new bar; the returned function advances it one step and names the next phase."""
        if self.bar is None:
            return lambda phase: None
        tid = self.bar.add_task(name, total=total)

        def step(phase: str) -> None:
            self.bar.update(tid, advance=1, description=f"{name}: {phase}")

        return step


class PruneRun:
    """State of one run; :meth:`run` is the whole command."""

    def __init__(self, settings: PruneSettings, command: str, quiet: bool = False) -> None:
        self.s, self.command, self.quiet = settings, command, quiet
        self.report: dict[str, Any] = {}

    # --- setup ------------------------------------------------------------------------------------

    def _strategy(self) -> None:
        from dsr1.registry import PluginRegistry

        s = self.s
        load_keys = sorted(LOAD_PRUNING_KEYS & set(s.strategy_options))
        if load_keys:  # these prune at load (an engine config's pruning:); here the flags say it
            raise Dsr1Error(f"--option {load_keys[0]} is for pruning at load in an engine config; dsr1 prune takes "
                            f"--target-sparsity, --calibration, --calibration-samples and --calibration-len")
        registry = PluginRegistry.from_env()
        self.spec = registry.load("pruning", s.strategy)
        self.pruner = registry.make("pruning", PluginChoice(name=s.strategy, options=s.strategy_options))
        self.origin = registry.origin("pruning", s.strategy)
        reasons = self.pruner.validate(s.device)
        if reasons:
            raise Dsr1Error(f"pruning strategy {s.strategy!r} cannot run on {s.device}: {'; '.join(reasons)}")
        caps = self.spec.capabilities
        mins = [float(c.split(":", 1)[1]) for c in caps if c.startswith("min_sparsity:")]
        self.stages = plan_stages(s, max(mins, default=0.0))

    def _load(self) -> None:
        from dsr1.auto import AutoModel
        from dsr1.models.loading import read_hf_config, resolve_model_dir

        s = self.s
        self.model_dir = resolve_model_dir(s.model)
        self.output.check_inputs([self.model_dir])  # a model found by name: not the output either
        hf = read_hf_config(self.model_dir)
        mt = str(hf["model_type"])
        if mt not in CAUSAL_TYPES + ENCODER_TYPES:
            raise Dsr1Error(f"dsr1 prune works on llama-family ({', '.join(CAUSAL_TYPES)}) and bert models; "
                            f"{str(self.model_dir)!r} has model_type {mt!r}")
        self.kind = "causal" if mt in CAUSAL_TYPES else "encoder"
        self.dtype = s.dtype or ("bfloat16" if s.device == "cuda" else "float32")
        load_cfg: dict[str, Any] = {"device": s.device}
        if self.kind == "causal":  # modules as transformers names them: masks and reports per q/k/v/gate/up
            load_cfg["model"] = {"name": "llama", "options": {"fuse": False, "weight_layout": "nk"}}
        self.model = AutoModel.from_pretrained(self.model_dir, load_cfg, dtype=self.dtype)
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise Dsr1Error(f"model {s.model!r} has no tokenizer.json; dsr1 prune needs one to evaluate and calibrate")
        self.hf = hf

    def _data(self) -> None:
        s, tok = self.s, self.tokenizer
        needs_cal = "activation_aware" in self.spec.capabilities or "calibration" in self.spec.capabilities
        source = s.calibration or "default: training split of the dsr1-tiny corpus (shipped with dsr1)"
        if self.kind == "causal":
            window = min(s.eval_window, int(self.hf.get("max_position_embeddings", s.eval_window)))
            self.eval_stream = textdata.heldout_stream(s.eval_text, tok, s.eval_tokens)
            self.window = window
            seq = min(s.calibration_len, window)
            self.calibration = textdata.calibration_windows(s.calibration, tok, s.calibration_samples, seq,
                                                            min_tokens=min(64, seq) if needs_cal else 2)
            self.recover_batches: list[Any] = []
            if s.recover_steps:  # fresh windows for every step where the text allows: 4 per batch
                more = textdata.calibration_windows(s.calibration, tok, 4 * s.recover_steps, seq)
                self.recover_batches = [torch.cat(more[i : i + 4]) for i in range(0, len(more), 4)]  # (4, T)
            n_eval = int(self.eval_stream.numel())
            self.report["evaluation"] = {
                "metric": "perplexity", "text": s.eval_text or textdata.DEFAULT_SOURCE, "tokens": n_eval,
                "window": window, "windows": -(-n_eval // window),
                "note": f"first {n_eval} tokens of the held-out split, non-overlapping {window}-token windows",
            }
            cal_tokens = sum(int(c.numel()) for c in self.calibration)
        else:
            docs = textdata.documents(s.eval_text, heldout=True, what="evaluation")
            self.eval_texts = textdata.sentences(docs, s.eval_sentences)
            if len(self.eval_texts) < 3:
                raise Dsr1Error(f"evaluation text holds {len(self.eval_texts)} usable sentences; at least 3 needed")
            texts = textdata.calibration_sentences(s.calibration, s.calibration_samples)
            limit = min(s.calibration_len, int(self.hf.get("max_position_embeddings", 512)))
            self.calibration = [tok(t, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
                                for t in texts]  # each (1, T_i)
            sents = textdata.calibration_sentences(s.calibration, 8 * s.recover_steps) if s.recover_steps else []
            self.recover_batches = [tok(sents[i : i + 8], return_tensors="pt", padding=True, truncation=True,
                                        max_length=limit) for i in range(0, len(sents), 8)]  # fresh per step
            self.report["evaluation"] = {
                "metric": "embedding fidelity to the dense model", "text": s.eval_text or textdata.DEFAULT_SOURCE,
                "sentences": len(self.eval_texts), "pairs": len(self.eval_texts) * (len(self.eval_texts) - 1) // 2,
                "note": "mean cosine of each sentence with its dense embedding; Spearman of all pairwise similarities",
            }
            cal_tokens = sum(int(c.numel()) for c in self.calibration)
        self.report["calibration"] = {"source": source, "samples": len(self.calibration), "tokens": cal_tokens,
                                      "used_by_strategy": needs_cal}

    # --- measuring --------------------------------------------------------------------------------

    def _accuracy(self) -> dict[str, Any]:
        if self.kind == "causal":
            ppl = perplexity(self.model, self.eval_stream, self.window)
            dense = self.report.get("dense", {}).get("accuracy", {}).get("perplexity", ppl)
            return {"perplexity": round(ppl, 4), "score": round(dense / ppl, 6)}
        emb = sentence_embeddings(self.model, self.tokenizer, self.eval_texts)
        if not hasattr(self, "dense_emb"):
            self.dense_emb = emb
        fid = embedding_fidelity(self.dense_emb, emb)
        return {**fid, "score": fid["mean_cosine"]}

    def _measure(self, model_dir: Path, config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "causal":
            return causal_speed(model_dir, config, settings)
        return encoder_speed(model_dir, config, settings, self.eval_texts)

    def _speed(self, model_dir: Path, stage: bool) -> dict[str, Any] | None:
        """The bench figures of a saved dir. A stage is measured between two measurements of the
        dense model (dense, stage, dense), and compared with their mean: drift cancels."""
        s = self.s
        if not s.speed:
            return None
        settings = {"device": s.device, "dtype": self.dtype, "threads": s.threads or torch.get_num_threads(),
                    "batch_size": s.speed_batch, "prompt_len": s.speed_prompt, "new_tokens": s.speed_new_tokens,
                    "reps": s.speed_reps}
        metric = HEADLINE[self.kind]
        dense_cfg: dict[str, Any] = {"device": s.device}
        if not stage:
            details = self._measure(model_dir, dense_cfg, settings)
            return {"metric": metric, "value": details[metric], "vs_dense": 1.0, "details": details,
                    "settings": settings}
        # the strategy may convert the loaded stage (semi24: sparse tensor cores on CUDA); the stage is pruned
        # already, so it loads with sparsity 0 (a strategy that cannot prune at load has nothing to convert)
        config = dict(dense_cfg)
        if issubclass(self.spec.options, PruningOptions):
            config["pruning"] = {"name": s.strategy, "options": {**s.strategy_options, "sparsity": 0.0}}
        before = self._measure(self.model_dir, dense_cfg, settings)[metric]
        details = self._measure(model_dir, config, settings)
        after = self._measure(self.model_dir, dense_cfg, settings)[metric]
        paired = (before + after) / 2
        return {"metric": metric, "value": details[metric], "vs_dense": round(details[metric] / paired, 3),
                "dense_paired": [before, after], "details": details, "settings": settings}

    def _point(self, name: str, target: float, step: float, c: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name, "dir": name if name != "dense" else None, "target_sparsity": target,
            "step_sparsity": round(step, 6), "realized_sparsity": c["realized_sparsity"],
            "params_fraction": round(c["prunable_nonzero"] / c["prunable_dense"], 6),
            "prunable_dense": c["prunable_dense"], "prunable_nonzero": c["prunable_nonzero"],
            "parameters": c["parameters"], "parameters_nonzero": c["parameters_nonzero"],
            "config_shapes": {k: self.model.config.get(k) for k in (
                "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size") if k in self.model.config},
            "transformers_loadable": transformers_expressible(self.model.config),
            "per_layer": c["per_layer"],
        }

    # --- the run ----------------------------------------------------------------------------------

    def _header(self) -> None:
        s = self.s
        from dsr1.benchmarks.common import cpu_model as _cpu_model
        from dsr1.benchmarks.common import version as _version

        self.report = {
            "command": self.command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": s.threads or torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name(0) if s.device == "cuda" else None},
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "python": platform.python_version(), "dsr1": _version("dsr1")},
            "model": s.model, "model_dir": str(self.model_dir),
            "model_name": s.model if os.sep not in s.model else f"{self.model_dir.parent.name}/{self.model_dir.name}",
            "model_type": self.hf["model_type"], "model_kind": self.kind,
            "strategy": {"name": s.strategy, "distribution": self.origin.distribution, "version": self.origin.version,
                         "options": self.pruner.options.model_dump(), "capabilities": sorted(self.spec.capabilities)},
            "settings": s.model_dump(), "schedule": {"kind": s.schedule, "stages": self.stages},
            "notes": list(getattr(self.pruner, "report_notes", lambda device: [])(s.device)),
            "interrupted": False, "accuracy_floor": None, **self.report, "dense": {}, "stages": [],
        }

    def run(self) -> int:
        """Prune, save, measure and report every stage; returns the exit code (1: below the floor)."""
        s = self.s
        check_settings(s)
        started = time.perf_counter()
        if s.threads:
            torch.set_num_threads(s.threads)
        torch.manual_seed(s.seed)
        self.output = plan_output_dir(s)
        self._strategy()
        self._load()
        self._data()
        # the previous output (if any) is swapped away only now, when the stages are about to be written
        out = self.output.claim()
        self.out = out
        self._header()
        original = original_shapes(self.model)
        p_dense = sum(layer.numel for layer in original)
        with Progress(self.quiet) as progress:
            step = progress.task("dense", 2)
            dense = self._point("dense", 0.0, 0.0, census(self.model, original))
            dense["accuracy"] = self._accuracy()
            dense["file_bytes"] = dir_bytes(self.model_dir)
            self.report["dense"] = dense
            if self.kind == "encoder" and s.recover_steps:  # distillation targets of the recovery steps
                with torch.inference_mode():
                    self.recover_targets = [self.model(**b.to(self.model.device)).sentence_embedding.float().cpu()
                                            for b in self.recover_batches]  # each (b, C)
            step("speed")
            dense["speed"] = self._speed(self.model_dir, stage=False)
            step("done")
            try:
                for target in self.stages:
                    self._stage(target, original, p_dense, progress)
            except KeyboardInterrupt:
                remove_partials(out)
                self.report["interrupted"] = True
                self.report["elapsed_s"] = round(time.perf_counter() - started, 2)
                write_all(out, self.report)
                raise
        self.report["elapsed_s"] = round(time.perf_counter() - started, 2)
        code = self._floor()
        write_all(out, self.report)
        if code:
            failed = self.report["accuracy_floor"]["failed"]
            print(f"dsr1: {failed[0]['stage']} fell below --accuracy-floor {s.accuracy_floor} (score "
                  f"{failed[0]['score']}); {len(failed)} stage(s) below it; everything else was written to {out}",
                  file=sys.stderr)
        return code

    def _stage(self, target: float, original: list[Any], p_dense: int, progress: Progress) -> None:
        s, name = self.s, stage_name(target)
        step = progress.task(name, 5 + s.recover_steps)
        times: dict[str, float] = {}
        t = time.perf_counter()
        step_sparsity = max(0.0, 1.0 - (1.0 - target) * p_dense / prunable_numel(self.model))
        prune_stage(self.pruner, self.model, min(step_sparsity, 1.0), self.calibration)
        times["prune"] = time.perf_counter() - t
        step("recover" if s.recover_steps else "evaluate")
        t = time.perf_counter()
        recovered = recover_(self.model, self.kind, s.recover_steps, s.recover_lr, self.recover_batches,
                             self._recover_targets() if s.recover_steps else None, on_step=lambda: step("recover"))
        times["recover"] = time.perf_counter() - t
        step("evaluate")
        t = time.perf_counter()
        point = self._point(name, target, step_sparsity, census(self.model, original))
        point["accuracy"] = self._accuracy()
        point["skipped"] = dict(self.pruner.skipped)
        point["recover"] = recovered
        times["evaluate"] = time.perf_counter() - t
        step("save")
        t = time.perf_counter()
        info = {k: v for k, v in point.items() if k != "per_layer"}
        info.update(strategy=self.report["strategy"], source_model=s.model)
        stage_dir = write_stage(self.model, self.out, name, {"pruning.json": (json.dumps(info, indent=2) + "\n").encode()})
        times["save"] = time.perf_counter() - t
        point["file_bytes"] = dir_bytes(stage_dir)
        point["seconds"] = {k: round(v, 3) for k, v in times.items()}
        point["speed"] = None
        self.report["stages"].append(point)
        write_all(self.out, self.report)  # the stage exists: the report says so before speed is measured
        step("speed")
        t = time.perf_counter()
        point["speed"] = self._speed(stage_dir, stage=True)
        point["seconds"]["speed"] = round(time.perf_counter() - t, 3)
        write_all(self.out, self.report)
        step("done")

    def _recover_targets(self) -> list[torch.Tensor] | None:
        """Dense sentence embeddings of the calibration batches (encoders; computed before stage 1)."""
        targets: list[torch.Tensor] | None = getattr(self, "recover_targets", None)
        return targets

    def _floor(self) -> int:
        floor = self.s.accuracy_floor
        if floor is None:
            return 0
        failed = [{"stage": p["name"], "score": p["accuracy"]["score"]} for p in self.report["stages"]
                  if p["accuracy"]["score"] < floor]
        metric = "dense perplexity / perplexity" if self.kind == "causal" else "mean cosine to dense"
        self.report["accuracy_floor"] = {"value": floor, "score": metric, "failed": failed}
        return 1 if failed else 0
