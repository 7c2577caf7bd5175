"""``python -m dsr1.benchmarks.kernel_sass``: the SASS loop reader on a fixed listing (always), and a real
compile of the SDK's int8 GEMV for sm_90 with no GPU (where triton is installed; ``make test`` has none)."""
from __future__ import annotations

import importlib.util

import pytest

from dsr1.benchmarks import kernel_sass

#: the shape of ``cuobjdump -sass`` output: one loop of five instructions (0x0040-0x0080) after a prologue, and a
#: forward branch that is not a loop
_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                /* 0x00000a0000017a02 */
        /*0010*/              @!P0 BRA 0x00a0 ;                          /* 0x0000008000008947 */
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;      /* 0x0000000402047981 */
        /*0050*/                   FFMA R8, R4, R5, R8 ;                 /* 0x0000000504087223 */
        /*0060*/                   FFMA R8, R6, R7, R8 ;                 /* 0x0000000706087223 */
        /*0070*/                   ISETP.NE.AND P0, PT, R9, RZ, PT ;     /* 0x000000ff0900720c */
        /*0080*/               @P0 BRA 0x0040 ;                          /* 0xfffffffc00ec0947 */
        /*00a0*/                   EXIT ;                                /* 0x000000000000794d */
"""


def test_loops_are_backward_branches_with_their_opcodes() -> None:
    assert kernel_sass.opcode("@!P0 LDG.E.128 R4, desc[UR4][R2.64]") == "LDG.E.128"
    (loop,) = kernel_sass.loops(_LISTING)
    assert (loop["start"], loop["end"], loop["instructions"]) == (0x40, 0x80, 5)
    assert loop["opcodes"] == {"FFMA": 2, "LDG.E.128": 1, "ISETP.NE.AND": 1, "BRA": 1}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_int8_gemv_compiles_for_sm90_with_wide_loads(capsys: pytest.CaptureFixture[str]) -> None:
    """The GEMV's loop reads its weights 16 bytes at a time and converts int8 without conversion instructions;
    a slow compile (tens of seconds) but no GPU."""
    signature = "x_ptr=*bf16,w_ptr=*i8,s_ptr=*bf16,z_ptr=*bf16,y_ptr=*bf16,ws_ptr=*fp32,cnt_ptr=*i32,N=i32,K=i32"
    code = kernel_sass.main(["dsr1_sdk.kernels.weight_only:_gemv_kernel", "--signature", signature, "--constexprs",
                             "FMT=0,GROUP=0,BLOCK_N=8,BLOCK_K=512,SPLIT_K=1,EVEN=1", "--warps", "4", "--weights", "32"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("registers ")
    innermost = out.splitlines()[1]
    assert "LDG.E.128" in innermost and "I2F" not in innermost, out


def test_bad_arguments_get_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any compile: with triton, a malformed pair or an unknown kernel; without it, triton itself."""
    for argv in (["nowhere:kernel", "--signature", "N=i32"], ["dsr1_sdk.kernels:nothing", "--signature", "Ni32"]):
        with pytest.raises(SystemExit) as exit_:
            kernel_sass.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("kernel_sass: "), err
