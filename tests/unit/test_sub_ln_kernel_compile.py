"""The Sub-LN's Triton kernels compile for Hopper (sm_90) on this CPU host: Triton's bundled LLVM and ptxas build
the cubin without a GPU, so a kernel that the interpreter accepts but the compiler rejects fails here, not on a
lent GPU. fp32 and bf16 inputs, the sizes of the GPU path's blocks."""

import pytest

pytestmark = pytest.mark.unit


def _signatures(dt: str) -> dict:
    rows = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
    return {
        "_row_stats": {"x_ptr": f"*{dt}", "stats_ptr": "*fp32", "C": "i32", "BLOCK": "constexpr"},
        "_normalize": {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}",
                       "stats_ptr": "*fp32", **rows, "C": "i32", "n": "fp32", "eps": "fp32", "BLOCK": "constexpr"},
        "_grad_row_sums": {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", **rows, "sums_ptr": "*fp32",
                           "C": "i32", "BLOCK": "constexpr"},
        "_grad_input": {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", **rows, "sums_ptr": "*fp32",
                        "dx_ptr": f"*{dt}", "C": "i32", "n": "fp32", "BLOCK": "constexpr"},
        "_grad_params": {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", **rows, "dw_ptr": "*fp32", "db_ptr": "*fp32",
                         "N": "i32", "C": "i32", "rows_per_split": "i32", "BLOCK_R": "constexpr",
                         "BLOCK_P": "constexpr"},
    }


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sub_ln_kernels_compile_to_sm90_cubin(monkeypatch, tmp_path, dtype):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from m2megatron_kernels import sub_ln_triton as kernels

    if kernels.INTERPRETED:
        pytest.skip("the kernels were defined under TRITON_INTERPRET")
    blocks = {"BLOCK": 1024, "BLOCK_R": kernels.BLOCK_R, "BLOCK_P": kernels.BLOCK_P}
    for name, signature in _signatures(dtype).items():
        constexprs = {k: blocks[k] for k, v in signature.items() if v == "constexpr"}
        compiled = triton.compile(ASTSource(fn=getattr(kernels, name), signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), name
