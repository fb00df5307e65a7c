"""The Triton kernels of the iBOT term (``logit_kernels="triton"``) against float64 references and the torch path.

They run here in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in conftest.py before triton is
imported): the same kernel code a GPU compiles, executed with numpy. Timing them needs a GPU
(``scripts/gpu_pretrain_check.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov3_eo.losses import (
    SinkhornAssignments,
    dino_crop_targets,
    dino_losses_fused,
    dino_losses_stacked,
    dino_target_index,
    ibot_loss,
    logit_kernels,
    sinkhorn_assignments,
    sinkhorn_knopp,
)
from dinov3_eo.losses.logit_kernels import (
    assignment_cross_entropy,
    check_kernels_can_run,
    exp_column_sums,
    exp_matvec,
    indexed_cross_entropy,
)
from dinov3_eo.ssl.compilation import LogitLosses, logit_losses_for, resolve_logit_kernels
from dinov3_eo.ssl.module import DINOv3Pretrain

pytestmark = pytest.mark.skipif(
    not logit_kernels.triton_available() or not logit_kernels._interpreting(),
    reason="needs triton, in its interpreter (TRITON_INTERPRET=1 before triton is imported)",
)

# sizes that are not multiples of any tile, so every kernel runs its masked edges
M, K = 37, 1000


def _logits(scale: float, dtype: torch.dtype, seed: int, rows: int = M) -> torch.Tensor:
    return (torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exp_matvec_equals_the_float64_products(dtype: torch.dtype) -> None:
    logits = _logits(2.0, dtype, 0)
    shift = logits.amax(dim=0).float()
    e = torch.exp((logits.double() - shift.double()) / 0.05)  # [M, K], what the kernel never writes
    gen = torch.Generator().manual_seed(1)
    v_cols, v_rows = torch.rand(K, generator=gen), torch.rand(M, generator=gen)
    rows = exp_matvec(logits, shift, 0.05, v_cols, transpose=False)
    cols = exp_matvec(logits, shift, 0.05, v_rows, transpose=True)
    assert rows.shape == (M,) and cols.shape == (K,) and rows.dtype == cols.dtype == torch.float32
    torch.testing.assert_close(rows.double(), e @ v_cols.double(), rtol=2e-6, atol=0)
    torch.testing.assert_close(cols.double(), e.t() @ v_rows.double(), rtol=2e-6, atol=0)
    empty = logits[:0]
    assert exp_matvec(empty, shift, 0.05, v_cols, transpose=False).shape == (0,)
    torch.testing.assert_close(exp_matvec(empty, shift, 0.05, v_rows[:0], transpose=True), torch.zeros(K))


def test_exp_column_sums_equal_the_maxima_and_the_float64_sums() -> None:
    logits = _logits(4.0, torch.bfloat16, 18, rows=130)  # three row tiles, the last one partial
    column_max, column_sum = exp_column_sums(logits, 0.04)
    expected_max = logits.float().amax(dim=0)
    assert torch.equal(column_max, expected_max)  # a maximum is exact
    expected = torch.exp((logits.double() - expected_max.double()) / 0.04).sum(dim=0)
    torch.testing.assert_close(column_sum.double(), expected, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="no rows"):
        exp_column_sums(logits[:0], 0.04)


def _reference_cross_entropy(student: torch.Tensor, probs: torch.Tensor, temp: float) -> torch.Tensor:
    """-Σ_k p_k log_softmax(z / τ)_k per row, straight from the formula in float64."""
    return -(probs.double() * torch.log_softmax(student.double() / temp, dim=-1)).sum(dim=-1)


def test_assignment_cross_entropy_value_and_gradient_equal_the_formula() -> None:
    teacher = _logits(2.0, torch.float32, 2)
    shift = teacher.amax(dim=0)
    gen = torch.Generator().manual_seed(3)
    # unnormalised scales: the target mass Σ_k p_ik is not 1, and enters the loss and its gradient
    row_scale, col_scale = torch.rand(M, generator=gen) + 0.5, torch.rand(K, generator=gen) + 0.5
    probs = torch.exp((teacher.double() - shift.double()) / 0.06) * row_scale.double()[:, None] * col_scale.double()
    student = _logits(3.0, torch.float32, 4).requires_grad_()
    ce = assignment_cross_entropy(student, teacher, shift, row_scale, col_scale, student_temp=0.1, teacher_temp=0.06)
    weights = torch.randn(M, generator=gen)
    (ce * weights).sum().backward()
    reference = student.detach().double().requires_grad_()
    expected = _reference_cross_entropy(reference, probs, 0.1)
    (expected * weights.double()).sum().backward()
    assert ce.shape == (M,) and ce.dtype == torch.float32
    torch.testing.assert_close(ce.double(), expected, rtol=1e-5, atol=1e-5)
    assert student.grad.dtype == torch.float32
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-4, atol=1e-5)


def test_bf16_student_logits_get_a_bf16_gradient_rounded_from_the_exact_one() -> None:
    teacher = _logits(2.0, torch.bfloat16, 5)
    targets = sinkhorn_assignments(teacher, 0.04)
    student = _logits(3.0, torch.bfloat16, 6).requires_grad_()
    ce = assignment_cross_entropy(student, targets.logits, targets.shift, targets.row_scale, targets.col_scale,
                                  student_temp=0.1, teacher_temp=0.04)
    ce.sum().backward()
    reference = student.detach().double().requires_grad_()
    _reference_cross_entropy(reference, targets.probabilities(), 0.1).sum().backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student.grad, reference.grad.bfloat16(), rtol=1e-2, atol=1e-3)  # one bf16 rounding


@pytest.mark.parametrize(("scale", "temp"), [(3.0, 0.04), (0.5, 0.07), (8.0, 0.04)])
def test_sinkhorn_assignments_equal_sinkhorn_knopp(scale: float, temp: float) -> None:
    """bf16 teacher logits as a GPU run has them; at 8x scale most of exp(logits / 0.04) underflows."""
    logits = _logits(scale, torch.bfloat16, 7)
    fused = sinkhorn_assignments(logits, temp)
    assert isinstance(fused, SinkhornAssignments) and fused.shape == (M, K) and fused.logits.data_ptr() == \
        logits.data_ptr()  # the teacher's logits themselves, no copy
    probs = fused.probabilities()
    torch.testing.assert_close(probs, sinkhorn_knopp(logits, temp), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(M), rtol=1e-5, atol=0)
    # balanced: every prototype receives about M / K of the total mass (exact after the last column step)
    assert fused.row_scale.shape == (M,) and fused.col_scale.shape == (K,)


def test_a_row_whose_exponentials_all_underflow_gets_no_target_and_no_nan() -> None:
    """Its row scale is 1 / tiny (Sinkhorn's guard); with many more tokens than prototypes the column scales exceed
    100, and their product with it would overflow: the kernels must scale as Sinkhorn does, row scale first."""
    gen = torch.Generator().manual_seed(17)
    teacher = torch.randn(2000, 16, generator=gen) * 3
    teacher[5] = -1000.0  # exp((-1000 - max) / 0.04) = 0 for every prototype
    teacher = teacher.bfloat16()
    student = (torch.randn(2000, 16, generator=gen) * 3).bfloat16().requires_grad_()
    weights = torch.rand(2000, generator=gen)
    fused = sinkhorn_assignments(teacher, 0.04)
    assert torch.isinf(fused.col_scale.max() * fused.row_scale[5])  # in float32, as a kernel would multiply them
    losses, grads = [], []
    for targets in (sinkhorn_knopp(teacher, 0.04), fused):
        loss = ibot_loss(student, targets, weights, 8)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, student)[0].float())
    assert torch.isfinite(grads[1]).all() and grads[1][5].abs().max() == 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-5)


def test_sinkhorn_assignments_of_no_rows() -> None:
    fused = sinkhorn_assignments(torch.empty(0, K), 0.04)
    assert fused.probabilities().shape == (0, K)
    with pytest.raises(ValueError, match="must be \\[B, K\\]"):
        sinkhorn_assignments(torch.zeros(K), 0.04)


def test_ibot_loss_on_factorised_targets_equals_the_torch_path() -> None:
    teacher = _logits(3.0, torch.bfloat16, 8)
    student = _logits(3.0, torch.bfloat16, 9).requires_grad_()
    weights = torch.rand(M, generator=torch.Generator().manual_seed(10))
    fused = ibot_loss(student, sinkhorn_assignments(teacher, 0.05), weights, 8, student_temp=0.1)
    (grad_fused,) = torch.autograd.grad(fused, student)
    torch_path = ibot_loss(student, sinkhorn_knopp(teacher, 0.05), weights, 8, student_temp=0.1)
    (grad_torch,) = torch.autograd.grad(torch_path, student)
    torch.testing.assert_close(fused, torch_path, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_fused.float(), grad_torch.float(), rtol=1e-2, atol=1e-5)  # bf16 gradients


def test_a_step_without_masked_tokens_has_a_zero_ibot_term_still_in_the_graph() -> None:
    student = torch.zeros(0, K, dtype=torch.bfloat16, requires_grad=True)
    loss = ibot_loss(student, sinkhorn_assignments(torch.zeros(0, K, dtype=torch.bfloat16), 0.05), torch.zeros(0), 8)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == (0, K)


def test_indexed_cross_entropy_equals_the_formula() -> None:
    gen = torch.Generator().manual_seed(12)
    table = torch.rand(3, K, generator=gen) * 2  # rows summing to ~K, not 1: the mass enters the loss
    index = torch.tensor([2, 0, 0, 1, 2, 1, 0], dtype=torch.int32)
    student = _logits(3.0, torch.float32, 13, rows=7).requires_grad_()
    ce = indexed_cross_entropy(student, table, index, student_temp=0.1)
    weights = torch.randn(7, generator=gen)
    (ce * weights).sum().backward()
    reference = student.detach().double().requires_grad_()
    expected = _reference_cross_entropy(reference, table.double()[index.long()], 0.1)
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(ce.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expected targets"):
        indexed_cross_entropy(student, table, index[:3], student_temp=0.1)


def test_dino_crop_targets_sum_the_other_teacher_crops() -> None:
    probs = torch.softmax(torch.randn(3 * 4, 50, generator=torch.Generator().manual_seed(14)), dim=-1)  # G=3, B=4
    table = dino_crop_targets(probs, 4)
    p = probs.view(3, 4, 50)
    torch.testing.assert_close(table[:4], p.sum(0))  # local crops: every teacher crop
    for s in range(3):
        torch.testing.assert_close(table[(1 + s) * 4 : (2 + s) * 4], p.sum(0) - p[s])
    two = dino_crop_targets(probs[:8], 4)  # G=2: the other crop's row itself, bit for bit
    assert torch.equal(two[4:8], probs[4:8]) and torch.equal(two[8:], probs[:4])
    assert dino_target_index(2, 3, 2).tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(("n_global", "n_local", "dtype"), [(2, 3, torch.bfloat16), (2, 0, torch.float32),
                                                            (3, 2, torch.float32)])
def test_fused_dino_terms_equal_the_torch_terms(n_global: int, n_local: int, dtype: torch.dtype) -> None:
    batch = 5
    teacher = sinkhorn_knopp(_logits(3.0, dtype, 15, rows=n_global * batch), 0.05)
    student = _logits(3.0, dtype, 16, rows=(n_global + n_local) * batch).requires_grad_()
    fused = dino_losses_fused(student, teacher, batch_size=batch, student_temp=0.1)
    reference = dino_losses_stacked(student, teacher, batch_size=batch, student_temp=0.1)
    assert (fused.n_global_crops, fused.n_local_crops) == (reference.n_global_crops, reference.n_local_crops)
    torch.testing.assert_close(fused.global_loss, reference.global_loss, rtol=1e-5, atol=1e-5)
    if n_local:
        torch.testing.assert_close(fused.local_loss, reference.local_loss, rtol=1e-5, atol=1e-5)
    else:
        assert fused.local_loss is None and reference.local_loss is None
    grads = []
    for terms in (fused, reference):
        total = terms.global_loss + (terms.local_loss if terms.local_loss is not None else 0)
        grads.append(torch.autograd.grad(total, student)[0].float())
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grads[0], grads[1], rtol=tolerance, atol=tolerance * float(grads[1].abs().max()))


def test_a_stage_with_triton_logit_kernels_computes_the_same_step() -> None:
    """``logit_kernels: triton`` changes how the iBOT term is computed, not what: same losses, same gradients."""
    kw = dict(backbone="vitmicro16", dino_out_dim=256, dino_hidden_dim=64, dino_bottleneck_dim=32, ibot_out_dim=320,
              ibot_hidden_dim=64, ibot_bottleneck_dim=32, global_crop_size=64, local_crop_size=32, n_local_crops=2,
              scale_lr_with_batch=False)
    batch = {"image": torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(11)), "valid": None}
    results = []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        module = DINOv3Pretrain(**kw, logit_kernels=kernels)
        module._total_steps = lambda: 100  # type: ignore[method-assign]  # schedules need a length outside a Trainer
        module.on_fit_start()
        losses = module.compute_losses(batch, step=3)
        grads = {}
        # the terms that changed, each alone (in the total, their gradients cancel to 1e-6 of their scale)
        for term in ("ibot", "dino_global", "dino_local"):
            module.zero_grad()
            losses[term].backward(retain_graph=True)
            grads |= {f"{term}:{n}": p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads, module.logit_losses))
    (torch_losses, torch_grads, torch_fns), (triton_losses, triton_grads, triton_fns) = results
    assert torch_fns == LogitLosses()
    assert triton_fns.ibot_targets is sinkhorn_assignments and triton_fns.dino_losses is dino_losses_fused
    assert torch_losses.keys() == triton_losses.keys() and torch_losses["ibot"] > 0
    for key in torch_losses:
        torch.testing.assert_close(triton_losses[key], torch_losses[key], rtol=1e-5, atol=1e-6)
    assert torch_grads.keys() == triton_grads.keys()
    for name, expected in torch_grads.items():  # float32 sums in another order: 1e-6 of each gradient's scale
        scale = float(expected.abs().max())
        torch.testing.assert_close(triton_grads[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_unusable_kernels_are_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="logit_kernels must be 'auto'.*'torch'.*'triton'"):
        DINOv3Pretrain(backbone="vitmicro16", logit_kernels="cuda")
    with pytest.raises(ValueError, match="contiguous \\[M, K\\]"):
        exp_matvec(torch.zeros(4, 3).t(), torch.zeros(4), 0.1, torch.ones(4), transpose=False)
    with pytest.raises(ValueError, match="differ in shape"):
        assignment_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(4), torch.ones(2), torch.ones(4),
                                 student_temp=0.1, teacher_temp=0.04)
    with pytest.raises(ValueError, match="runs on CUDA devices, not meta"):
        check_kernels_can_run(torch.device("meta"))
    monkeypatch.setattr(logit_kernels, "_interpreting", lambda: False)  # a CPU outside the interpreter
    with pytest.raises(ValueError, match="runs on CUDA devices, not cpu.*set logit_kernels: torch"):
        logit_losses_for(compile=False, kernels="triton", device="cpu")
    with pytest.raises(ValueError, match="runs on CUDA devices"):
        exp_matvec(torch.zeros(2, 3), torch.zeros(3), 0.1, torch.ones(3), transpose=False)
    monkeypatch.setattr(logit_kernels, "triton", None)
    with pytest.raises(RuntimeError, match="needs the 'triton' package"):
        check_kernels_can_run(torch.device("cuda"))


def test_auto_takes_the_kernels_on_a_cuda_device_with_triton_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages' default: the kernels where they run compiled (CUDA with triton), torch ops anywhere else, the CPU
    included even with Triton's interpreter on (a test aid, 100x slower than torch)."""
    assert resolve_logit_kernels("auto", "cuda") == "triton"
    assert resolve_logit_kernels("auto", torch.device("cuda", 1)) == "triton"
    assert resolve_logit_kernels("auto", "cpu") == "torch"
    assert resolve_logit_kernels("torch", "cuda") == "torch" and resolve_logit_kernels("triton", "cpu") == "triton"
    module = DINOv3Pretrain(backbone="vitmicro16", dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16,
                            ibot_out_dim=64, ibot_hidden_dim=32, ibot_bottleneck_dim=16)
    assert module.hparams.logit_kernels == "auto"
    module._total_steps = lambda: 10  # type: ignore[method-assign]  # schedules need a length outside a Trainer
    module.on_fit_start()
    assert module.logit_kernels_in_use == "torch" and module.logit_losses.dino_losses is dino_losses_stacked
    # as after a fit on a GPU: the next fit, on the CPU, sets the torch losses up again instead of keeping the kernels
    module.logit_losses = logit_losses_for(compile=False, kernels="triton", device="cpu")
    module.logit_kernels_in_use = "triton"
    module.on_fit_start()
    assert module.logit_kernels_in_use == "torch" and module.logit_losses == LogitLosses()
    monkeypatch.setattr(logit_kernels, "triton", None)  # a CUDA machine without triton (e.g. Windows wheels)
    assert resolve_logit_kernels("auto", "cuda") == "torch"


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_the_kernels_compile_for_t4_a100_and_h100_without_spilling() -> None:
    """What the interpreter cannot check: each kernel at the module's tiles compiles to a cubin for sm_75, sm_80 and
    sm_90 (triton's own ptxas, no GPU needed), and keeps its tile in registers."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from compile_logit_kernels import TILES
    finally:
        sys.path.remove(str(SCRIPTS))
    defaults = [logit_kernels._MATVEC_BLOCK, logit_kernels._FORWARD_BLOCK, logit_kernels._BACKWARD_BLOCK]
    assert [tiles[0] for tiles in TILES.values()] == defaults  # the script compiles the tiles the module launches
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPTS / "compile_logit_kernels.py"), "--defaults"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if "B spilled" in line]
    assert len(rows) == (2 + 2 + 2) * 2 * 3  # (Sinkhorn's 2, forward and backward in 2 modes) x dtypes x GPUs
    assert all(" 0 B spilled" in line for line in rows), "\n".join(rows)
    # with the alignment a launch on torch tensors gives, the [M, K] reads are vectorised (8 bf16 per load)
    assert all(" 0 of " not in line for line in rows), "\n".join(rows)
    assert "36 of 36 compiled; 0 spill registers" in done.stdout
