"""Issue 16: dsr1 on the CPU against llama.cpp, the engine CPU users pick, on the same weights, in one process.

    python -m dsr1.benchmarks.llamacpp --work-dir /tmp/lcpp --threads 2 --prompt-len 64 --new-tokens 64 \\
        --rounds 3 --output bench/results/cpu-llamacpp/llamacpp-cpu.json

Benchmark only, never part of ``make test``: it needs ``llama-cpp-python`` (built from source, several minutes
on two cores) and ``gguf``, best installed apart from the engine's environment::

    python -m pip install --target /tmp/lcpplib llama-cpp-python gguf
    PYTHONPATH=/tmp/lcpplib python -m dsr1.benchmarks.llamacpp ...

What it does, on the ``tiny-125m`` Llama shape (random weights, written once under ``--work-dir``):

* **The same checkpoint as GGUF.** The safetensors weights are written to an f32 GGUF with ``gguf``
  (llama.cpp's own Python package), the tensors named and the q/k rows permuted as llama.cpp's
  ``convert_hf_to_gguf.py`` does for Llama. The converter itself is not used: it refuses a tokenizer it does
  not know, and this checkpoint has none, so the GGUF carries a placeholder vocabulary (prompts are token ids).
  ``llama_model_quantize`` then makes the ``f16`` and ``q8_0`` files.
* **Pairs, timed in alternating rounds:** dsr1 fp32 against llama.cpp f32, dsr1 int8 (weight-only, per
  channel) and dsr1 w8a8 (int8 activations too, per token, as q8_0's matmuls quantize theirs per block of 32)
  against q8_0, and dsr1 bf16 against f16. Batch 1, greedy, ``--threads`` threads for both.
  ``decode_ratio`` is the ratio of the two medians; ``decode_ratio_paired`` the median of each round's ratio
  (the two engines of a round ran back to back, so a slow minute of the shared memory slows both).
  dsr1's decode tok/s is (N − 1) / (t(N) − t(1)) over ``model.generate`` calls (what ``dsr1 bench`` reports);
  llama.cpp's is N / the time of N single-token ``eval`` calls after the prompt's. Prefill tok/s is the
  prompt over its own time (dsr1: the 1-token generate).
* **Agreement:** the greedy tokens of dsr1 fp32 and llama.cpp f32 for the same prompt (a converter that got
  the layout wrong shows here first).
* **The floor:** each format's weight bytes over the CPU's weight-read bandwidth measured in the same run
  (:func:`~dsr1.benchmarks.common.bandwidth_gbs`), once before the pairs and again after every round: on a
  machine whose neighbours share its memory the read speed moves by half within minutes, and one probe at
  the start was a floor that llama.cpp beat. The floor is the fastest probe of the run.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dsr1.benchmarks import common
from dsr1.benchmarks.tiered import write_checkpoint
from dsr1.errors import Dsr1Error

SHAPE = "tiny-125m"
#: dsr1's precision config and llama.cpp's file type (``llama_ftype``) of each pair
#: (int8, w8a8: activations and scales in fp32; this CPU class has no bf16 arithmetic to gain from)
PAIRS: dict[str, tuple[dict[str, Any], str, int]] = {
    "fp32": ({"quant": "fp32"}, "f32", 0),
    "int8": ({"quant": {"name": "int8", "options": {"compute_dtype": "fp32"}}}, "q8_0", 7),
    "w8a8": ({"quant": {"name": "w8a8", "options": {"compute_dtype": "fp32"}}}, "q8_0", 7),
    "bf16": ({"quant": "bf16"}, "f16", 1),
}
#: HF tensor name (after ``model.layers.{i}.``) → GGUF name (after ``blk.{i}.``)
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def rope_permute(w: Any, heads: int) -> Any:
    """HF's q/k rows (rotate-half pairs) in llama.cpp's order, as ``convert_hf_to_gguf.py`` permutes them."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, hf: dict[str, Any], out: Path) -> Path:
    """``model_dir``'s safetensors weights as an f32 GGUF at ``out`` (written beside, then renamed)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    if out.exists():
        return out
    heads, kv = int(hf["num_attention_heads"]), int(hf["num_key_value_heads"])
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(int(hf["max_position_embeddings"]))
    w.add_embedding_length(int(hf["hidden_size"]))
    w.add_block_count(int(hf["num_hidden_layers"]))
    w.add_feed_forward_length(int(hf["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(int(hf["hidden_size"]) // heads)
    w.add_rope_freq_base(float(hf["rope_theta"]))
    w.add_layer_norm_rms_eps(float(hf["rms_norm_eps"]))
    w.add_file_type(0)  # all f32
    vocab = int(hf["vocab_size"])
    w.add_tokenizer_model("llama")  # a placeholder vocabulary: the prompts are token ids
    w.add_token_list([f"<t{i}>".encode() for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(int(hf["bos_token_id"]))
    w.add_eos_token_id(int(hf["eos_token_id"]))
    # bf16 has no numpy dtype: read with torch, hand gguf numpy float32
    state = {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(int(hf["num_hidden_layers"])):
        for src, dst in LAYER_NAMES.items():
            t = state[f"model.layers.{i}.{src}"]
            if src.startswith("self_attn.q_proj"):
                t = rope_permute(t, heads)
            elif src.startswith("self_attn.k_proj"):
                t = rope_permute(t, kv)
            w.add_tensor(f"blk.{i}.{dst}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def quantize(f32: Path, ftype: int, out: Path, threads: int) -> Path:
    """``f32`` re-typed by llama.cpp's own ``llama_model_quantize``."""
    import llama_cpp

    if ftype == 0 or out.exists():
        return f32 if ftype == 0 else out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    tmp = out.with_name(f".{out.name}.tmp")
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params) != 0:
        raise Dsr1Error(f"llama_model_quantize to file type {ftype} failed")
    tmp.replace(out)
    return out


class LlamaCpp:
    """One GGUF loaded by llama-cpp-python; greedy decode from token ids."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                         n_batch=context, verbose=False)

    def run(self, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        """(prefill seconds, seconds of ``new`` one-token evals, the greedy tokens)."""
        import numpy as np

        import llama_cpp

        llm = self.llm
        ctx, vocab = llm.ctx, llm.n_vocab()

        def last_logits() -> Any:  # the last evaluated token's row (llama-cpp-python keeps none without logits_all)
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))

        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tokens = []
        for _ in range(new):
            tok = int(np.argmax(last_logits()))
            tokens.append(tok)
            llm.eval([tok])
        return t1 - t0, time.perf_counter() - t1, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.llamacpp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="where the checkpoint and the GGUF files are written (reused)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds per engine and precision, alternating")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    p.add_argument("--graph", choices=("eager", "compile"), default="eager",
                   help="dsr1's graph pass for every pair (compile: inductor's CPU code, which cuts the per-token "
                        "Python and launch cost of a small model)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    pairs = [x for x in args.pairs.split(",") if x]
    if not pairs or any(x not in PAIRS for x in pairs):
        raise Dsr1Error(f"--pairs takes names of {', '.join(PAIRS)}, got {args.pairs!r}")
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as err:
        raise Dsr1Error(f"this benchmark needs llama-cpp-python and gguf ({err.name} is missing): python -m pip "
                        "install --target /tmp/lcpplib llama-cpp-python gguf, then PYTHONPATH=/tmp/lcpplib") from None
    import torch

    from dsr1.auto import AutoModel
    from dsr1.benchmarks.cuda_timing import decode_rate

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).expanduser().resolve()
    model_dir, hf, numel = write_checkpoint(SHAPE, work, "cpu")
    f32 = write_gguf(model_dir, hf, work / f"{SHAPE}-f32.gguf")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, int(hf["vocab_size"]), (1, args.prompt_len), generator=gen)
    probes = [common.bandwidth_gbs("cpu")]
    rows = []
    report: dict[str, Any] = {
        "command": "python -m dsr1.benchmarks.llamacpp " + shlex.join(sys.argv[1:] if argv is None else argv),
        **common.environment("cpu", args.threads), "shape": SHAPE, "bandwidth_gbs": None, "bandwidth_probes": [],
        "settings": {"threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "rounds": args.rounds, "llama_cpp_python": llama_cpp.__version__,
                     "dsr1_graph": args.graph},
        "results": rows,
    }
    context = args.prompt_len + args.new_tokens + 8
    for name in pairs:
        overrides, gguf_type, ftype = PAIRS[name]
        path = quantize(f32, ftype, work / f"{SHAPE}-{gguf_type}.gguf", args.threads)
        model = AutoModel.from_pretrained(model_dir, device="cpu", graph=args.graph, **overrides)
        lcpp = LlamaCpp(path, args.threads, context)

        def dsr1_generate(n: int) -> Any:
            return model.generate(prompt, max_new_tokens=n, ignore_eos=True)

        dsr1_generate(4 if args.graph == "eager" else args.new_tokens + 1)  # warm-up: packing, kernels, compiles
        lcpp.run(prompt[0].tolist(), 4)
        got: dict[str, list[float]] = {"dsr1_decode": [], "dsr1_prefill": [], "lcpp_decode": [], "lcpp_prefill": []}
        for _ in range(args.rounds):
            rate = decode_rate(f"dsr1 {name}", dsr1_generate, 1, args.prompt_len, args.new_tokens, reps=2)
            got["dsr1_decode"].append(rate["decode_tok_s"])
            got["dsr1_prefill"].append(rate["prefill_tok_s"])
            pre, dec, lcpp_tokens = lcpp.run(prompt[0].tolist(), args.new_tokens)
            got["lcpp_decode"].append(args.new_tokens / dec)
            got["lcpp_prefill"].append(args.prompt_len / pre)
            probes.append(common.bandwidth_gbs("cpu"))
        bandwidth = max(probes)
        report["bandwidth_gbs"], report["bandwidth_probes"] = round(bandwidth, 2), [round(b, 2) for b in probes]
        med = {k: statistics.median(v) for k, v in got.items()}
        weight_bytes = path.stat().st_size
        row = {
            "pair": f"dsr1 {name} / llama.cpp {gguf_type}", "gguf_bytes": weight_bytes,
            **{k: round(v, 1) for k, v in med.items()},
            "decode_ratio": round(med["dsr1_decode"] / med["lcpp_decode"], 3),
            # each round's two engines ran minutes apart at most: the median of their ratios cancels the
            # memory's slow swings that the two medians, taken over different rounds, keep
            "decode_ratio_paired": round(statistics.median(
                a / b for a, b in zip(got["dsr1_decode"], got["lcpp_decode"])), 3),
            "prefill_ratio": round(med["dsr1_prefill"] / med["lcpp_prefill"], 3),
            "lcpp_floor_tok_s": round(bandwidth * 1e9 / weight_bytes, 1),
            "rounds": {k: [round(x, 1) for x in v] for k, v in got.items()},
        }
        if name == "fp32":  # the conversion's check: the same weights decode the same greedy tokens
            ours = dsr1_generate(args.new_tokens)[0, args.prompt_len:].tolist()
            row["same_greedy_tokens"] = sum(1 for a, b in zip(ours, lcpp_tokens) if a == b)
            row["first_difference"] = next((i for i, (a, b) in enumerate(zip(ours, lcpp_tokens)) if a != b), None)
        rows.append(row)
        print(f"{row['pair']}: decode {med['dsr1_decode']:.1f} vs {med['lcpp_decode']:.1f} tok/s "
              f"({row['decode_ratio']:.2f}x, by round {row['decode_ratio_paired']:.2f}x), prefill "
              f"{med['dsr1_prefill']:.1f} vs {med['lcpp_prefill']:.1f} ({row['prefill_ratio']:.2f}x)", flush=True)
        common.write_report(report, args.output)
    for row in rows:  # every pair against the fastest probe of the whole run
        row["lcpp_floor_tok_s"] = round(max(probes) * 1e9 / row["gguf_bytes"], 1)
    print(common.write_report(report, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
