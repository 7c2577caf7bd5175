"""``dsr1 generate``: stream a completion of PROMPT to stdout through the full plugin pipeline."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from dsr1.errors import Dsr1Error


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt",
                              description="Generate text with a model through the configured plugin pipeline.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text; '-' reads it from stdin (UTF-8)")
    p.add_argument("--model", default="dsr1-tiny", help="model name or HF-format directory")
    p.add_argument("--config", help="engine config file (YAML/TOML/JSON)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="a reasoning model's thinking budget: after this many tokens in the <think> block, "
                        "</think> is forced and the answer follows (default: no budget)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--quiet", action="store_true", help="no progress bar while the model loads")
    p.set_defaults(func=run)


def read_prompt(arg: str) -> str:
    """``arg``, or stdin's text when ``arg`` is ``-`` (one trailing newline dropped, as ``echo`` adds it)."""
    if arg != "-":
        return arg
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise Dsr1Error(f"stdin is not valid UTF-8 (byte {err.start}); pass the prompt in UTF-8") from None
    return text[:-1] if text.endswith("\n") else text


def run(args: argparse.Namespace) -> int:
    from dsr1.generation import _check_params as check_params  # the checks model.generate makes

    args.prompt = read_prompt(args.prompt)
    if not args.prompt.strip():
        raise Dsr1Error("empty prompt; pass the text to continue, e.g. dsr1 generate 'The Python interpreter' "
                        "(or '-' to read it from stdin)")
    # every argument is checked before the model loads and before anything is printed
    check_params(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                 args.temperature > 0)
    if args.max_thinking_tokens is not None and args.max_thinking_tokens < 0:
        raise Dsr1Error(f"--max-thinking-tokens must be an integer >= 0, got {args.max_thinking_tokens}")
    from dsr1.auto import AutoModel, AutoTokenizer, encoder_error, require_causal_lm
    from dsr1.progress import progress

    require_causal_lm(args.model, args.config)

    chat = None
    if args.chat:  # the checkpoint's template is rendered before its weights load: a bad one fails at once
        chat = AutoTokenizer.from_pretrained(args.model, args.config).apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt")
    started = time.perf_counter()
    with progress(f"loading {args.model}", quiet=args.json or args.quiet):
        model = AutoModel.from_pretrained(args.model, args.config)
    load_s = time.perf_counter() - started
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise Dsr1Error(f"model {args.model!r} has no tokenizer.json; dsr1 generate needs one")
    if not hasattr(model, "generate"):
        raise encoder_error(args.model, model.config.get("model_type"))
    enc = chat if chat is not None else tokenizer(args.prompt, return_tensors="pt")
    sampling = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        max_thinking_tokens=args.max_thinking_tokens,
    )
    monitor = model.pipeline.monitor
    if args.json:
        out = model.generate(enc["input_ids"], enc["attention_mask"], **sampling)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        eos = set(model.generation_defaults.get("eos_token_id") or [])
        stats = monitor.generation_stats()  # the Monitor interface: any monitor plugin works here
        text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
        report = {
            "model": args.model,
            "prompt": args.prompt,
            "text": text,
            # a reasoning model's <think> block and the answer after it (null, null: no thinking markers)
            **_reasoning(tokenizer, enc["input_ids"][0].tolist(), text),
            "prompt_tokens": int(enc["input_ids"].shape[1]),
            "new_tokens": stats.decode_tokens if stats.decode_tokens is not None else len(new),
            "timings": {  # null: the monitor did not measure it
                "load_s": round(load_s, 4),
                "prefill_s": _rounded(stats.prefill_s, 4),
                "decode_s": _rounded(stats.decode_s, 4),
                "decode_tok_s": _rounded(stats.decode_tok_s, 2),
            },
            "kvcache_bytes": stats.kvcache_bytes,
            "pipeline": model.pipeline.describe(),
        }
        graph_report = getattr(model.runtime.steps, "report", None)
        if graph_report is not None:  # a graph pass that chooses plans as it runs (adaptive): what it chose
            report["graph_plan"] = graph_report()
        placement = model.runtime.placement
        if placement is not None:  # a pool that plans (tiered): where each unit lives
            report["pool_plan"] = placement.as_dict()
        precision_map = getattr(model.pipeline.quant, "precision_map", None)
        if callable(precision_map):  # a quant policy that reports per-layer precision (int8, dynamic ...)
            report["precision_map"] = precision_map(model)
            report["precision_switches"] = [e for e in monitor.stream() if e.get("event") == "quant.switch"]
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    pieces = iter(model.generate(enc["input_ids"], enc["attention_mask"], stream=True, **sampling))
    # the first piece before the prompt is echoed: the arguments against the model (context length),
    # the prefill, and the device's first-use work (a kernel build notice on stderr) all come first,
    # so nothing they print lands inside the generated line
    first = next(pieces, "")
    sys.stdout.write(args.prompt + first)
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _reasoning(tokenizer: Any, prompt_ids: list[int], text: str) -> dict[str, str | None]:
    """``reasoning`` and ``answer`` of ``text`` when the tokenizer has thinking markers."""
    from dsr1.decoding.reasoning import split_reasoning, starts_in_thinking, thinking_ids

    if thinking_ids(tokenizer) is None:
        return {"reasoning": None, "answer": None}
    prompt_tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
    reasoning, answer = split_reasoning(text, in_thinking=starts_in_thinking(prompt_tail))
    return {"reasoning": reasoning, "answer": answer}


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
