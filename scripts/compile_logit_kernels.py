"""Compile the Triton kernels of the iBOT and DINO terms (``dinov3_eo.losses.logit_kernels``) for real GPUs, without
one.

The tests run the kernels in Triton's interpreter, which executes them with numpy and checks neither the types a GPU
compilation needs nor what a tile costs in registers. This script compiles each kernel ahead of time for a T4 (sm_75,
the common free cloud GPU), an A100 (sm_80) and an H100 (sm_90) at the module's tile sizes and at those
``gpu_pretrain_check.py`` sweeps, down to the cubin, with triton's bundled ``ptxas``, and prints each one's registers
per thread, spills, shared memory and how many of its global loads are 128-bit vector loads. A kernel that does not
compile, spills or reads its logits 16 bits at a time shows here before a GPU is lent.

    .venv/bin/python scripts/compile_logit_kernels.py             # every tile; exits 1 if any kernel fails to compile
    .venv/bin/python scripts/compile_logit_kernels.py --defaults  # the tiles the module uses (what the tests compile)
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: (rows, columns, warps) of each tile setting of dinov3_eo.losses.logit_kernels, compiled here and timed by
#: gpu_pretrain_check.py: the module's default first, then tiles with fewer and more elements per thread
TILES = {
    "_MATVEC_BLOCK": [(64, 128, 8), (32, 256, 8), (8, 512, 4), (16, 512, 8), (64, 256, 8)],
    "_FORWARD_BLOCK": [(4, 1024, 4), (2, 1024, 8), (1, 2048, 8), (4, 512, 8), (1, 1024, 4)],
    "_BACKWARD_BLOCK": [(4, 512, 8), (4, 256, 4), (8, 256, 8), (8, 512, 8), (16, 512, 8)],
}
#: each kernel and the tile setting it launches with
KERNELS = {
    "column_max_and_sum": "_MATVEC_BLOCK",
    "exp_matvec": "_MATVEC_BLOCK",
    "cross_entropy_forward": "_FORWARD_BLOCK",
    "cross_entropy_backward": "_BACKWARD_BLOCK",
}
ARCHS = {"T4": 75, "A100": 80, "H100": 90}


def _signature(kernel: str, logits: str, factorised: bool) -> tuple[dict[str, str], dict[str, object]]:
    """Argument types as a launch on [M, K] ``logits``-typed tensors passes them, and the constexprs besides tiles
    (the cross-entropy's teacher is the teacher's logits when ``factorised``, else a float32 target table)."""
    f32 = "*fp32"
    if kernel == "column_max_and_sum":
        names = ["logits_ptr", "max_ptr", "sum_ptr", "n_rows", "n_cols", "exp2_scale"]
        return dict(zip(names, [logits, f32, f32, "i32", "i32", "fp32"])), {}
    if kernel == "exp_matvec":
        names = ["logits_ptr", "shift_ptr", "vec_ptr", "partial_ptr", "n_rows", "n_cols", "exp2_scale"]
        types = [logits, f32, f32, f32, "i32", "i32", "fp32"]
        return dict(zip(names, types)), {"OVER_COLS": True}
    teacher = logits if factorised else f32
    if kernel == "cross_entropy_forward":
        names = ["student_ptr", "teacher_ptr", "shift_ptr", "row_scale_ptr", "col_scale_ptr", "index_ptr", "loss_ptr",
                 "lse_ptr", "mass_ptr", "n_rows", "n_cols", "student_scale", "teacher_exp2_scale"]
        types = [logits, teacher, f32, f32, f32, "*i32", f32, f32, f32, "i32", "i32", "fp32", "fp32"]
    else:
        names = ["student_ptr", "teacher_ptr", "shift_ptr", "row_scale_ptr", "col_scale_ptr", "index_ptr", "lse_ptr",
                 "mass_ptr", "grad_ptr", "grad_in_ptr", "n_rows", "n_cols", "student_scale", "teacher_exp2_scale"]
        types = [logits, teacher, f32, f32, f32, "*i32", f32, f32, logits, f32, "i32", "i32", "fp32", "fp32"]
    return dict(zip(names, types)), {"FACTORISED": factorised}


def _launch_attrs(fn, signature: dict[str, str]) -> dict[tuple[int], list]:  # noqa: ANN001
    """What triton's launcher tells the compiler on a GPU at the sizes that matter: every pointer 16-byte aligned (as
    torch allocates) and the column count a multiple of 16 (K = 65,536), so that loads can be vectorised. Without
    these hints the compile here is pessimistic: scalar 16-bit loads throughout."""
    names = list(fn.arg_names)
    hinted = [name for name, kind in signature.items() if kind.startswith("*") or name == "n_cols"]
    return {(names.index(name),): [["tt.divisibility", 16]] for name in hinted}


def _ptxas_report(ptx: str, ptxas: Path) -> dict[str, int]:
    """Registers and spill bytes of one PTX module, as ``ptxas -v`` reports them, and its global loads: how many
    are 128-bit vector loads (a streaming kernel's bulk loads should be)."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([str(ptxas), f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=True)
    finally:
        os.unlink(f.name)
    text = done.stdout + done.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    loads = re.findall(r"\bld\.global\S*", ptx)
    return {"registers": registers, "spill_bytes": spills, "global_loads": len(loads),
            "vector_loads": sum(".v4." in load for load in loads)}  # 128 bits each


def compile_all(dtypes: list[str], *, defaults_only: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_logit_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing).")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dinov3_eo.losses import logit_kernels

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    rows = []
    for kernel, setting in KERNELS.items():
        fn = getattr(logit_kernels, f"_{kernel}_kernel")
        tiles = TILES[setting][:1] if defaults_only else TILES[setting]
        single = not kernel.startswith("cross_entropy")
        modes = [True] if single else [True, False]  # the cross-entropy's targets: factorised, or a table
        for dtype, factorised, (block_m, block_k, warps) in itertools.product(dtypes, modes, tiles):
            signature, constexprs = _signature(kernel, f"*{dtype}", factorised)
            consts = {**constexprs, "BLOCK_M": block_m, "BLOCK_K": block_k}
            label = kernel if single else f"{kernel} ({'factorised' if factorised else 'table'})"
            for name, capability in ARCHS.items():
                row = {"kernel": label, "dtype": dtype, "tile": f"{block_m}x{block_k}x{warps}", "gpu": name}
                source = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(consts, "constexpr")},
                                   constexprs=consts, attrs=_launch_attrs(fn, signature))
                try:
                    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                              options={"num_warps": warps})
                    row |= _ptxas_report(compiled.asm["ptx"], ptxas) | {"shared_bytes": compiled.metadata.shared}
                except Exception as error:  # noqa: BLE001 - reported, and the exit status says it
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                rows.append(row)
                status = row.get("error") or (f"{row['registers']} registers, {row['spill_bytes']} B spilled, "
                                              f"{row['shared_bytes']} B shared, {row['vector_loads']} of "
                                              f"{row['global_loads']} loads 128-bit")
                print(f"[kernels] {label:36s} {dtype:5s} {row['tile']:11s} {name}: {status}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bf16,fp32", help="logits dtypes to compile for (bf16, fp16, fp32)")
    parser.add_argument("--defaults", action="store_true", help="only the module's default tiles")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows = compile_all(args.dtypes.split(","), defaults_only=args.defaults)
    failed = [row for row in rows if "error" in row]
    spilled = [row for row in rows if row.get("spill_bytes")]
    print(f"[kernels] {len(rows) - len(failed)} of {len(rows)} compiled; {len(spilled)} spill registers", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
