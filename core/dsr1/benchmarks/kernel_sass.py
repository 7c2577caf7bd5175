"""What a Triton kernel compiles to on a GPU this machine does not have: registers, shared memory, and the
instructions of each loop, counted from the SASS (no device time).

    python -m dsr1.benchmarks.kernel_sass dsr1_sdk.kernels.weight_only:_gemv_kernel \\
        --signature "x_ptr=*bf16,w_ptr=*i8,s_ptr=*bf16,z_ptr=*bf16,y_ptr=*bf16,ws_ptr=*fp32,cnt_ptr=*i32,N=i32,K=i32" \\
        --constexprs "FMT=0,GROUP=0,BLOCK_N=8,BLOCK_K=512,SPLIT_K=1,EVEN=1" --warps 4 --stages 3 --weights 32

Pointer arguments and the integers named in ``--divisible`` (default ``N,K``) are compiled as multiples of 16,
as Triton specializes them at run time when they are; without that, loads are not vectorized. ``--weights``
(weights each thread handles per trip of the innermost loop) adds instructions per weight.

The SASS comes from ``cuobjdump`` in Triton's own package (``triton/backends/nvidia/bin``). It answers the
questions METHOD.md puts before a device call: are the loads 16 bytes wide, are there barriers or shared-memory
conversions in the loop, how many registers does a thread hold (so how many warps fit). It says nothing about
time: the int4 kernels of ``bench/results/kernels16/int4-experiments/`` went from 9.6 to about 4 instructions
per weight and ran no faster.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def instructions(sass: str) -> list[tuple[int, str]]:
    """``cuobjdump -sass`` text → ``(address, instruction)`` in order."""
    return [(int(m.group(1), 16), m.group(2)) for m in (_LINE.search(line) for line in sass.splitlines()) if m]


def opcode(instruction: str) -> str:
    """``@!P0 LDG.E.128 R4, [R2.64]`` → ``LDG.E.128``."""
    return _PREDICATE.sub("", instruction).split()[0]


def loops(sass: str) -> list[dict[str, Any]]:
    """Each backward branch's body (its target through the branch): instruction count and opcode histogram,
    innermost (shortest) first."""
    code = instructions(sass)
    found = []
    for address, text in code:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            body = [t for a, t in code if int(m.group(1), 16) <= a <= address]
            ops = collections.Counter(opcode(t) for t in body)
            found.append({"start": int(m.group(1), 16), "end": address, "instructions": len(body),
                          "opcodes": dict(ops.most_common())})
    return sorted(found, key=lambda loop: loop["instructions"])


def _pairs(text: str, what: str) -> dict[str, str]:
    items = [item for item in text.split(",") if item]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"{what} item {bad[0]!r} is not name=value (e.g. N=i32 or BLOCK_N=8)")
    return dict(item.split("=", 1) for item in items)


def _ints(pairs: dict[str, str], what: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in pairs.items()}
    except ValueError as err:
        raise ValueError(f"{what} values are integers: {err}") from None


def _cuobjdump() -> Path:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise ValueError(f"no cuobjdump at {tool}; install a triton wheel with the NVIDIA backend")
    return tool


def compile_kernel(target: str, signature: dict[str, str], constexprs: dict[str, int], divisible: set[str],
                   arch: int, warps: int, stages: int) -> Any:
    """``module:function`` (a ``@triton.jit`` function) compiled for ``sm_<arch>`` with no GPU present."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"no kernel {target!r} ({err}); give module:function of a @triton.jit kernel") from None
    while not isinstance(fn, triton.runtime.JITFunction):  # an autotuned or heuristics-wrapped kernel
        fn = fn.fn
    names = list(signature) + [n for n in constexprs if n not in signature]
    full = {n: signature.get(n, "constexpr") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(full.items())
             if t.startswith("*") or n in divisible}
    src = ASTSource(fn=fn, signature=full, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps,
                                                                           "num_stages": stages})


def report(kernel: Any, weights: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = _cuobjdump()
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    out: dict[str, Any] = {"registers": int(regs.group(1)) if regs else None, "shared_bytes": kernel.metadata.shared,
                           "loops": loops(sass)}
    if weights:
        for loop in out["loops"]:
            loop["per_weight"] = round(loop["instructions"] / weights, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", help="module:function of a @triton.jit kernel")
    p.add_argument("--signature", required=True, help="name=type,... for the runtime arguments (*bf16, i32 ...)")
    p.add_argument("--constexprs", default="", help="name=int,... for the constexpr arguments")
    p.add_argument("--divisible", default="N,K", help="integer arguments compiled as multiples of 16")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--weights", type=float, default=None, help="weights per thread per innermost-loop trip")
    args = p.parse_args(argv)
    if importlib.util.find_spec("triton") is None:
        p.exit(2, "kernel_sass: needs the triton package (pip install triton; it compiles with no GPU)\n")
    try:
        constexprs = _ints(_pairs(args.constexprs, "--constexprs"), "--constexprs")
        signature = _pairs(args.signature, "--signature")
        try:
            kernel = compile_kernel(args.kernel, signature, constexprs, set(args.divisible.split(",")), args.arch,
                                    args.warps, args.stages)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - triton's compile errors: a wrong signature or constexpr
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{args.kernel} does not compile with that signature and constexprs: {first}") from None
        out = report(kernel, args.weights)
    except ValueError as err:
        p.exit(2, f"kernel_sass: {err}\n")
    print(f"registers {out['registers']}, shared {out['shared_bytes']} B")
    for loop in out["loops"]:
        rate = f", {loop['per_weight']} per weight" if "per_weight" in loop else ""
        top = ", ".join(f"{k} {v}" for k, v in list(loop["opcodes"].items())[:12])
        print(f"loop {loop['start']:#x}-{loop['end']:#x}: {loop['instructions']} instructions{rate}: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
