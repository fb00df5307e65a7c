"""Per-module gradient clipping when each process holds a shard of every gradient (FSDP, ``use_orig_params``): two
gloo processes clip their shards as one process clips the whole gradients."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3_eo.ssl.schedules import clip_grad_norm_per_module

pytestmark = pytest.mark.slow  # two interpreters: 3-15 s on the 2-core CI machine

WORLD = 2
MAX_NORM = 3.0


def whole_gradients() -> dict[str, list[torch.Tensor]]:
    """Per module, its parameters' gradients: the backbone's above the clip, the head's below it."""
    gen = torch.Generator().manual_seed(7)
    return {"backbone": [torch.randn(5, 6, generator=gen) * 2, torch.randn(5, generator=gen) * 2],
            "head": [torch.randn(3, 5, generator=gen) * 0.1, torch.randn(3, generator=gen) * 0.1]}


def shard(grad: torch.Tensor, index: int, process: int) -> torch.Tensor | None:
    """Process ``process``'s part of a flattened gradient, as FSDP's flat shards cut them: uneven cuts, and the
    first parameter of each module held by process 0 alone (the other holds no gradient for it)."""
    flat = grad.flatten()
    if index == 0:
        return flat.clone() if process == 0 else None
    cut = flat.numel() // 3
    return (flat[:cut] if process == 0 else flat[cut:]).clone()


def _worker(process: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process, world_size=WORLD)
    try:
        modules = {}
        for name, grads in whole_gradients().items():
            params = []
            for i, grad in enumerate(grads):
                part = shard(grad, i, process)
                if part is not None:
                    param = torch.nn.Parameter(torch.zeros_like(part))
                    param.grad = part
                    params.append(param)
            modules[name] = params
        local = {name: torch.linalg.vector_norm(torch.cat([p.grad for p in params])) for name, params in modules.items()}
        norms = clip_grad_norm_per_module(modules, MAX_NORM, sharded=True)
        torch.save({"norms": norms, "local": local,
                    "grads": {name: [p.grad for p in params] for name, params in modules.items()}},
                   Path(out_dir) / f"rank{process}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sharded_gradients_clip_as_the_whole(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    whole = {name: [torch.nn.Parameter(torch.zeros_like(g)) for g in grads] for name, grads in whole_gradients().items()}
    for name, grads in whole_gradients().items():
        for param, grad in zip(whole[name], grads):
            param.grad = grad.clone()
    expected = clip_grad_norm_per_module(whole, MAX_NORM)  # one process, whole gradients
    assert expected["backbone"] > MAX_NORM > expected["head"]  # one module clipped, one left alone
    for result in results:
        for name in expected:
            torch.testing.assert_close(result["norms"][name], expected[name])
    # each local norm alone would have scaled that shard by its own factor
    assert not torch.allclose(results[1]["local"]["backbone"], expected["backbone"])
    for name, params in whole.items():
        for i, param in enumerate(params):
            parts = [results[0]["grads"][name][i]] if i == 0 else [
                results[0]["grads"][name][i], results[1]["grads"][name][i - 1]]  # process 1 holds no first parameter
            torch.testing.assert_close(torch.cat(parts), param.grad.flatten())
