"""Triton kernels for the logit losses (``logit_kernels: triton``): for the iBOT term's [masked tokens, K] logits,
Sinkhorn–Knopp's matrix-vector products and the soft cross-entropy, computed from the teacher's logits in their own
dtype, without ever writing the assignment matrix; for the DINO terms, the same cross-entropy over every crop.

Why: with K = 65,536 prototypes and thousands of masked tokens a step, the iBOT term costs memory traffic, not
arithmetic. The torch path (eager or compiled) writes the float32 matrix ``exp((logits − shift) / T)`` (1 GB at
3,800 tokens), reads it for every half-iteration of Sinkhorn, scales it into float32 assignments, and reads those and
a float32 copy of the student's logits again in the cross-entropy: 26.5 GiB read and written at that size (each aten
op's tensors counted). Here the assignments stay factorised,
``p[i, k] = exp((t[i, k] − shift[k]) / T) · row_scale[i] · col_scale[k]``
(:class:`~dinov3_eo.losses.sinkhorn.SinkhornAssignments`), and every kernel recomputes the exponential from the
teacher's bf16 logits as it reads them: Sinkhorn reads them once per half-iteration (the prototypes' maxima and their
first sums in one read), the cross-entropy's forward reads both networks' logits once and its backward once more
while writing the gradient: 5.1 GiB at the same size.

The same cross-entropy kernels serve the DINO terms with explicit targets (:func:`indexed_cross_entropy`): every
student crop's row against the summed teacher rows it is compared with, gathered from a small float32 table.

The kernels run on CUDA tensors; on CPU tensors they run in Triton's interpreter (numpy, for tests: slow).
Every function here takes contiguous [M, K] logits.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # Linux's CUDA wheels of torch ship triton; elsewhere the torch path is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = tl = None

__all__ = [
    "assignment_cross_entropy",
    "check_kernels_can_run",
    "exp_column_sums",
    "exp_matvec",
    "indexed_cross_entropy",
    "triton_available",
]

_LOG2E = 1.0 / math.log(2.0)


def triton_available() -> bool:
    """Whether the ``triton`` package imports (it ships with torch's CUDA wheels on Linux)."""
    return triton is not None


#: ``triton.jit``, which compiles for the GPU, or, with ``TRITON_INTERPRET=1`` set before triton is imported, wraps a
#: kernel for Triton's interpreter (CPU tensors: how the tests run these kernels)
_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _exp_matvec_kernel(logits_ptr, shift_ptr, vec_ptr, partial_ptr, n_rows, n_cols, exp2_scale,  # noqa: ANN001
                       OVER_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # one [BLOCK_M, BLOCK_K] tile of E = exp2((logits − shift) · exp2_scale); its partial product goes to row
    # pid_k of partial [n_col_blocks, n_rows] (E @ vec) or row pid_m of partial [n_row_blocks, n_cols] (Eᵀ @ vec)
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    logits = tl.load(logits_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    e = tl.where(ok, tl.exp2((logits - shift[None, :]) * exp2_scale), 0.0)
    if OVER_COLS:
        vec = tl.load(vec_ptr + cols, mask=col_ok, other=0.0)
        tl.store(partial_ptr + pid_k.to(tl.int64) * n_rows + rows, tl.sum(e * vec[None, :], axis=1), mask=row_ok)
    else:
        vec = tl.load(vec_ptr + rows, mask=row_ok, other=0.0)
        tl.store(partial_ptr + pid_m.to(tl.int64) * n_cols + cols, tl.sum(e * vec[:, None], axis=0), mask=col_ok)


@_jit
def _column_max_and_sum_kernel(logits_ptr, max_ptr, sum_ptr, n_rows, n_cols, exp2_scale,  # noqa: ANN001
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # one [BLOCK_M, BLOCK_K] tile: each column's maximum over the tile's rows, and the sum of exp2((x − that max) ·
    # exp2_scale) over them, into row pid_m of the partial [n_row_blocks, n_cols] maxima and sums
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x = tl.where(row_ok[:, None], x, float("-inf"))  # every tile has a valid row; columns past the end stay 0
    column_max = tl.max(x, axis=0)
    column_sum = tl.sum(tl.exp2((x - column_max[None, :]) * exp2_scale), axis=0)  # exp2(-inf) = 0 for padded rows
    offsets = pid_m.to(tl.int64) * n_cols + cols
    tl.store(max_ptr + offsets, column_max, mask=col_ok)
    tl.store(sum_ptr + offsets, column_sum, mask=col_ok)


@_jit
def _cross_entropy_forward_kernel(student_ptr, teacher_ptr, shift_ptr, row_scale_ptr, col_scale_ptr,  # noqa: ANN001
                                  index_ptr, loss_ptr, lse_ptr, mass_ptr, n_rows, n_cols, student_scale,
                                  teacher_exp2_scale, FACTORISED: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
    # BLOCK_M rows per program, their K columns in BLOCK_K chunks: an online log-sum-exp of x = z · student_scale
    # and the sums Σ p'·x and Σ p' of the targets p'. FACTORISED: p' = exp2((t − shift) · scale) · col_scale from
    # the teacher's logits in the student's row; otherwise p' is row index[i] of the float32 target table at
    # teacher_ptr. Both are multiplied by row_scale at the end
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_start = rows.to(tl.int64)[:, None] * n_cols
    if FACTORISED:
        target_start = row_start
    else:
        target_start = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None] * n_cols
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    dot = tl.zeros([BLOCK_M], tl.float32)
    mass = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(student_ptr + row_start + cols[None, :], mask=ok, other=0.0).to(tl.float32) * student_scale
        t = tl.load(teacher_ptr + target_start + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if FACTORISED:
            shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
            col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
            p = tl.exp2((t - shift[None, :]) * teacher_exp2_scale) * col_scale[None, :]  # 0 past the last column
        else:
            p = t
        dot += tl.sum(p * x, axis=1)  # nothing past the last column (p = x = 0 there)
        x = tl.where(col_ok[None, :], x, float("-inf"))  # rows past the end stay finite (0)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
        mass += tl.sum(p, axis=1)
    # loaded in both modes (ones for a table): with a constant 1 folded away, triton 3.8's thread-locality pass
    # fails on the accumulator's two uses below (an assertion, found by scripts/compile_logit_kernels.py)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    lse = running_max + tl.log(running_sum)
    mass = mass * row_scale
    tl.store(loss_ptr + rows, mass * lse - row_scale * dot, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(mass_ptr + rows, mass, mask=row_ok)


@_jit
def _cross_entropy_backward_kernel(student_ptr, teacher_ptr, shift_ptr, row_scale_ptr, col_scale_ptr,  # noqa: ANN001
                                   index_ptr, lse_ptr, mass_ptr, grad_ptr, grad_in_ptr, n_rows, n_cols, student_scale,
                                   teacher_exp2_scale, FACTORISED: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    # d loss_i / d z_ik = student_scale · (mass_i · softmax(x_i)_k − p_ik), times the incoming gradient of loss_i
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    z = tl.load(student_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if FACTORISED:
        t = tl.load(teacher_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
        row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        # row scale first, as Sinkhorn applies it: a row whose every exponential underflowed has a huge row scale
        # (1 / tiny), whose product with a column scale alone could overflow to inf, and 0 · inf is NaN
        p = tl.exp2((t - shift[None, :]) * teacher_exp2_scale) * row_scale[:, None] * col_scale[None, :]
    else:
        target_start = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None] * n_cols
        p = tl.load(teacher_ptr + target_start + cols[None, :], mask=ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mass = tl.load(mass_ptr + rows, mask=row_ok, other=0.0)
    grad_in = tl.load(grad_in_ptr + rows, mask=row_ok, other=0.0) * student_scale
    softmax = tl.exp(z * student_scale - lse[:, None])
    grad = grad_in[:, None] * (mass[:, None] * softmax - p)
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=ok)


def _interpreting() -> bool:
    """Whether triton decorates kernels for its interpreter (``TRITON_INTERPRET=1`` when it was imported)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def check_kernels_can_run(device: torch.device) -> None:
    """Raise a clear error where these kernels cannot run: without triton, or off CUDA (the CPU only in Triton's
    interpreter)."""
    if triton is None:
        raise RuntimeError("logit_kernels='triton' needs the 'triton' package (it ships with torch's CUDA wheels on "
                           "Linux); set logit_kernels: torch.")
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"logit_kernels='triton' runs on CUDA devices, not {device} (a CPU only in Triton's "
                         "interpreter, TRITON_INTERPRET=1 set before triton is imported); set logit_kernels: torch.")


def _check_logits(name: str, t: Tensor) -> None:
    if t.ndim != 2 or not t.is_contiguous():
        raise ValueError(f"logit_kernels: {name} must be a contiguous [M, K] tensor, got shape {tuple(t.shape)} "
                         f"and strides {t.stride()}.")


# Tiles as (rows, columns, warps). These kernels stream memory, so what limits them is how many loads are in flight:
# tiles of 8-16 elements per thread, which compile to 48-64 registers on an H100 (scripts/compile_logit_kernels.py)
# and leave room for five or more blocks per SM; the first tiles tried, 32-64 elements per thread, took 128-200
# registers (one block per SM). Timed on an H100 (scripts/gpu_pretrain_check.py sweeps five of each, ViT-S batch 64):
# the cross-entropy's forward is the one that gained from more columns in flight (4x1024x4 0.50 ms, 2x1024x8 0.58),
# at 126 registers; the others' defaults were within 3-7 % of the best tile in two runs.
_MATVEC_BLOCK = (64, 128, 8)
_FORWARD_BLOCK = (4, 1024, 4)
_BACKWARD_BLOCK = (4, 512, 8)


def exp_matvec(logits: Tensor, shift: Tensor, temperature: float, vec: Tensor, *, transpose: bool) -> Tensor:
    """``E @ vec`` or ``Eᵀ @ vec`` for ``E = exp((logits − shift) / temperature)``, without writing E.

    Args:
        logits: [M, K] contiguous, any float dtype (read as float32).
        shift: [K] float32, subtracted from every row (the prototypes' maxima keep E in [0, 1]).
        temperature: T > 0.
        vec: [K] (``transpose=False``) or [M] (``transpose=True``) float32.
        transpose: compute ``Eᵀ @ vec`` (a [K] column sum) instead of ``E @ vec`` (an [M] row sum).

    Returns:
        [M] or [K] float32.
    """
    check_kernels_can_run(logits.device)
    _check_logits("logits", logits)
    n_rows, n_cols = logits.shape
    block_m, block_k, warps = _MATVEC_BLOCK
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_k))
    if n_rows == 0:
        return vec.new_zeros(n_cols if transpose else 0)
    partial = torch.empty((grid[0], n_cols) if transpose else (grid[1], n_rows), dtype=torch.float32,
                          device=logits.device)
    _exp_matvec_kernel[grid](
        logits, shift.float().contiguous(), vec.float().contiguous(), partial, n_rows, n_cols,
        _LOG2E / temperature, OVER_COLS=not transpose, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )
    return partial.sum(dim=0)


def exp_column_sums(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Each column's maximum and ``Σ_i exp((logits[i, k] − max_k) / temperature)``, in one read of ``logits``.

    Sinkhorn's shift and its first prototype sums (``Eᵀ·1``) together: each tile keeps its own column maxima and
    sums relative to them, combined here (the sums rescaled to the overall maxima).

    Args:
        logits: [M, K] contiguous, any float dtype, M ≥ 1.
        temperature: T > 0.

    Returns:
        ``column_max`` [K] and ``column_sum`` [K], float32.
    """
    check_kernels_can_run(logits.device)
    _check_logits("logits", logits)
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        raise ValueError("exp_column_sums: logits have no rows, so no column has a maximum.")
    block_m, block_k, warps = _MATVEC_BLOCK
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_k))
    maxima, sums = (torch.empty((grid[0], n_cols), dtype=torch.float32, device=logits.device) for _ in range(2))
    _column_max_and_sum_kernel[grid](logits, maxima, sums, n_rows, n_cols, _LOG2E / temperature, BLOCK_M=block_m,
                                     BLOCK_K=block_k, num_warps=warps)
    column_max = maxima.amax(dim=0)  # [K]
    return column_max, (sums * torch.exp2((maxima - column_max) * (_LOG2E / temperature))).sum(dim=0)


class _FusedCrossEntropy(torch.autograd.Function):
    """Per-row ``−Σ_k p_ik · log_softmax(z_i / τ)_k`` with ``p`` factorised (``factorised``: ``teacher`` holds the
    teacher's logits, see the module docstring) or gathered (``teacher`` a float32 table, ``index`` its row for each
    student row)."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher: Tensor, shift: Tensor, row_scale: Tensor,  # noqa: ANN001
                col_scale: Tensor, index: Tensor, student_temp: float, teacher_temp: float, factorised: bool) -> Tensor:
        n_rows, n_cols = student_logits.shape
        device = student_logits.device
        loss, lse, mass = (torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(3))
        if n_rows:
            block_m, block_k, warps = _FORWARD_BLOCK
            _cross_entropy_forward_kernel[(triton.cdiv(n_rows, block_m),)](
                student_logits, teacher, shift, row_scale, col_scale, index, loss, lse, mass, n_rows, n_cols,
                1.0 / student_temp, _LOG2E / teacher_temp, FACTORISED=factorised, BLOCK_M=block_m, BLOCK_K=block_k,
                num_warps=warps,
            )
        ctx.save_for_backward(student_logits, teacher, shift, row_scale, col_scale, index, lse, mass)
        ctx.settings = (student_temp, teacher_temp, factorised)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        student_logits, teacher, shift, row_scale, col_scale, index, lse, mass = ctx.saved_tensors
        student_temp, teacher_temp, factorised = ctx.settings
        n_rows, n_cols = student_logits.shape
        grad_logits = torch.empty_like(student_logits)
        if n_rows:
            block_m, block_k, warps = _BACKWARD_BLOCK
            grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_k))
            _cross_entropy_backward_kernel[grid](
                student_logits, teacher, shift, row_scale, col_scale, index, lse, mass, grad_logits,
                grad.float().contiguous(), n_rows, n_cols, 1.0 / student_temp, _LOG2E / teacher_temp,
                FACTORISED=factorised, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
            )
        return grad_logits, None, None, None, None, None, None, None, None


def assignment_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, shift: Tensor, row_scale: Tensor,
                             col_scale: Tensor, *, student_temp: float, teacher_temp: float) -> Tensor:
    """Cross-entropy of each row of ``student_logits / student_temp`` against the factorised assignments
    ``p[i, k] = exp((teacher_logits[i, k] − shift[k]) / teacher_temp) · row_scale[i] · col_scale[k]``.

    ``ce[i] = Σ_k p_ik · lse(z_i / τ) − Σ_k p_ik z_ik / τ`` (= ``−Σ_k p_ik log_softmax(z_i / τ)_k``); the gradient
    reaches ``student_logits`` only, in their dtype.

    Args:
        student_logits: [M, K] contiguous, any float dtype.
        teacher_logits: [M, K] contiguous, any float dtype.
        shift: [K] float32. row_scale: [M] float32. col_scale: [K] float32.
        student_temp, teacher_temp: temperatures > 0.

    Returns:
        [M] float32 cross-entropies.
    """
    check_kernels_can_run(student_logits.device)
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"assignment_cross_entropy: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape.")
    vectors = [v.detach().float().contiguous() for v in (shift, row_scale, col_scale)]
    unused_index = vectors[1]  # a pointer the factorised kernels never read
    return _FusedCrossEntropy.apply(student_logits, teacher_logits.detach(), *vectors, unused_index,
                                    float(student_temp), float(teacher_temp), True)


def indexed_cross_entropy(student_logits: Tensor, targets: Tensor, target_index: Tensor, *,
                          student_temp: float) -> Tensor:
    """Cross-entropy of each row of ``student_logits / student_temp`` against the target row ``target_index[i]``.

    ``ce[i] = −Σ_k targets[target_index[i], k] · log_softmax(z_i / τ)_k``: each student row is read once and its
    gradient written once, in its dtype, whatever the number of rows sharing a target (the DINO term's crops).

    Args:
        student_logits: [N, K] contiguous, any float dtype.
        targets: [R, K] target weights (float32; rows need not sum to 1).
        target_index: [N] integer rows of ``targets`` in ``[0, R)``.
        student_temp: τ > 0.

    Returns:
        [N] float32 cross-entropies.
    """
    check_kernels_can_run(student_logits.device)
    _check_logits("student_logits", student_logits)
    if targets.ndim != 2 or targets.shape[1] != student_logits.shape[1] or target_index.shape != student_logits.shape[:1]:
        raise ValueError(f"indexed_cross_entropy: expected targets [R, {student_logits.shape[1]}] and target_index "
                         f"[{student_logits.shape[0]}], got {tuple(targets.shape)} and {tuple(target_index.shape)}.")
    table = targets.detach().float().contiguous()
    ones = torch.ones(student_logits.shape[0], dtype=torch.float32, device=student_logits.device)  # row scales
    return _FusedCrossEntropy.apply(student_logits, table, table, ones, table, target_index.to(torch.int32),
                                    float(student_temp), 1.0, False)
