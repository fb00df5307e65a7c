"""Two gloo processes on CPU give the same Sinkhorn–Knopp, DINO and distributed-KoLeo results as one process
holding the whole global batch."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3_eo.losses import dino_losses, koleo_loss_distributed, sinkhorn_assignments, sinkhorn_knopp
from dinov3_eo.losses.logit_kernels import triton_available
from dinov3_eo.ssl.compilation import compile_logit_losses
from dinov3_eo.ssl.distributed import all_gather_with_grad, all_reduce_max, all_reduce_sum, rank, world_size
from dinov3_eo.ssl.stage import LossReadback

# spawning two interpreters takes 3-15 s on the shared 2-core CI machine
pytestmark = pytest.mark.slow

WORLD = 2
LOCAL_B = 4  # images per rank
K = 11
D = 6
IBOT_ROWS = (5, 3)  # masked patches per rank differ
KOLEO_GROUPS = (None, 4, 2)  # whole global batch, one rank, half a rank


def global_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return {
        # teacher CLS logits, per rank crop-major [2·b, K]
        "teacher": torch.randn(WORLD, 2 * LOCAL_B, K, generator=gen) * 3,
        "student_global": torch.randn(WORLD, 2 * LOCAL_B, K, generator=gen),
        "student_local": torch.randn(WORLD, 3 * LOCAL_B, K, generator=gen),
        "ibot": torch.randn(sum(IBOT_ROWS), K, generator=gen) * 3,
        "koleo": torch.randn(WORLD * LOCAL_B, D, generator=gen),
    }


def _worker(process_rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process_rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # compile in this process, not in a pool of compile workers: a pool inside a gloo process once aborted
        # ("terminate called without an active exception") under the load of the whole suite
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        data = global_inputs()
        result: dict[str, object] = {"rank": rank(), "world": world_size()}
        probs = sinkhorn_knopp(data["teacher"][process_rank], 0.05)
        result["sk"] = probs
        terms = dino_losses(data["student_global"][process_rank], data["student_local"][process_rank], probs,
                            batch_size=LOCAL_B)
        result["dino_global"] = terms.global_loss
        result["dino_local"] = terms.local_loss
        start = sum(IBOT_ROWS[:process_rank])
        result["sk_ibot"] = sinkhorn_knopp(data["ibot"][start : start + IBOT_ROWS[process_rank]], 0.05)
        # as model.compile runs it (ssl.compilation.compile_logit_losses): the collectives inside still line up
        compiled = compile_logit_losses().sinkhorn_knopp
        result["sk_ibot_compiled"] = compiled(data["ibot"][start : start + IBOT_ROWS[process_rank]], 0.05)
        if triton_available():  # logit_kernels="triton", in Triton's interpreter (tests/conftest.py)
            fused = sinkhorn_assignments(data["ibot"][start : start + IBOT_ROWS[process_rank]], 0.05)
            result["sk_ibot_triton"] = fused.probabilities()
        for group_size in KOLEO_GROUPS:
            x = data["koleo"][process_rank * LOCAL_B : (process_rank + 1) * LOCAL_B].clone().requires_grad_(True)
            loss = koleo_loss_distributed(x, group_size=group_size)
            loss.backward()
            result[f"koleo_{group_size}"] = loss.detach()
            result[f"koleo_grad_{group_size}"] = x.grad
        y = torch.full((2, 3), float(process_rank + 1), requires_grad=True)
        gathered = all_gather_with_grad(y)
        (gathered * torch.arange(gathered.shape[0], dtype=torch.float32)[:, None]).sum().backward()
        result["gathered"] = gathered.detach()
        result["gather_grad"] = y.grad
        # the non-finite guard's read-back: a NaN on rank 1 alone reaches both ranks, and the logged values are means
        readback = LossReadback({"total": torch.tensor(float("nan") if process_rank == 1 else 2.0),
                                 "ibot": torch.tensor(1.0 + process_rank)}).values()
        result["readback_total"], result["readback_ibot"] = readback["total"], readback["ibot"]
        local = torch.tensor([process_rank + 1.0])
        result["reduced"], result["reduce_input"] = all_reduce_sum(local), local
        result["reduced_max"] = all_reduce_max(local)
        torch.save(result, Path(out_dir) / f"rank{process_rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_helpers_fall_back_without_process_group() -> None:
    t = torch.tensor([1.0, 2.0])
    assert world_size() == 1 and rank() == 0
    # one process: the input itself, no copy (one device launch less per call)
    assert all_reduce_sum(t) is t and all_reduce_max(t) is t
    assert all_gather_with_grad(t) is t


def test_collectives(rank_results: list[dict]) -> None:
    for r, res in enumerate(rank_results):
        assert res["rank"] == r and res["world"] == WORLD
        torch.testing.assert_close(res["reduced"], torch.tensor([3.0]))
        torch.testing.assert_close(res["reduced_max"], torch.tensor([2.0]))
        assert torch.isnan(res["readback_total"])  # every rank stops, not rank 1 alone
        assert float(res["readback_ibot"]) == 1.5  # the mean over the ranks
        torch.testing.assert_close(res["reduce_input"], torch.tensor([r + 1.0]))  # the input is left as it was
        torch.testing.assert_close(res["gathered"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
        # gradient of Σ_ranks Σ_i i·gathered_i w.r.t. this rank's slice: (rows of the slice) × WORLD ranks
        rows = torch.arange(2 * r, 2 * r + 2, dtype=torch.float32)[:, None].expand(2, 3)
        torch.testing.assert_close(res["gather_grad"], rows * WORLD)


def test_sinkhorn_equals_single_process(rank_results: list[dict]) -> None:
    data = global_inputs()
    single = sinkhorn_knopp(data["teacher"].reshape(-1, K), 0.05).view(WORLD, 2 * LOCAL_B, K)
    for r, res in enumerate(rank_results):
        torch.testing.assert_close(res["sk"], single[r], rtol=1e-5, atol=1e-6)
    # iBOT: ranks hold different numbers of masked patches; B is their all-reduced total
    single_ibot = sinkhorn_knopp(data["ibot"], 0.05)
    torch.testing.assert_close(torch.cat([res["sk_ibot"] for res in rank_results]), single_ibot, rtol=1e-5, atol=1e-6)
    compiled = torch.cat([res["sk_ibot_compiled"] for res in rank_results])
    torch.testing.assert_close(compiled, single_ibot, rtol=1e-5, atol=1e-6)
    if "sk_ibot_triton" in rank_results[0]:
        fused = torch.cat([res["sk_ibot_triton"] for res in rank_results])
        torch.testing.assert_close(fused, single_ibot, rtol=1e-5, atol=1e-6)


def test_dino_mean_over_ranks_equals_single_process(rank_results: list[dict]) -> None:
    data = global_inputs()

    def to_global(per_rank: torch.Tensor, n_crops: int) -> torch.Tensor:
        # [W, n·b, K] per rank crop-major -> [n·W·b, K] crop-major over the global batch
        return per_rank.view(WORLD, n_crops, LOCAL_B, K).transpose(0, 1).reshape(-1, K)

    probs = sinkhorn_knopp(to_global(data["teacher"], 2), 0.05)
    terms = dino_losses(to_global(data["student_global"], 2), to_global(data["student_local"], 3), probs,
                        batch_size=WORLD * LOCAL_B)
    mean_global = sum(res["dino_global"] for res in rank_results) / WORLD
    mean_local = sum(res["dino_local"] for res in rank_results) / WORLD
    torch.testing.assert_close(mean_global, terms.global_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_local, terms.local_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size", KOLEO_GROUPS)
def test_distributed_koleo_equals_single_process(rank_results: list[dict], group_size: int | None) -> None:
    data = global_inputs()
    x = data["koleo"].clone().requires_grad_(True)
    single = koleo_loss_distributed(x, group_size=group_size)
    (single * WORLD).backward()  # DDP averages the W rank losses: d(Σ_r L_r)/dx = W · d(mean)/dx
    mean = sum(res[f"koleo_{group_size}"] for res in rank_results) / WORLD
    torch.testing.assert_close(mean, single.detach(), rtol=1e-5, atol=1e-6)
    grads = torch.cat([res[f"koleo_grad_{group_size}"] for res in rank_results])
    torch.testing.assert_close(grads, x.grad, rtol=1e-4, atol=1e-6)
