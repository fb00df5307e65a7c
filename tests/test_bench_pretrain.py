"""The step benchmark's device-only branches (back-to-back steps, host queueing time, the loss read-backs), run on meta
tensors as a stand-in for a GPU: device time is scarce (15 minutes a session), and a slip in code that only a GPU
reaches would cost a whole device run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from meta_device import allow_meta_autocast

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SMALL_HEADS = dict(dino_out_dim=256, ibot_out_dim=256, dino_hidden_dim=64, ibot_hidden_dim=64, dino_bottleneck_dim=32,
                   ibot_bottleneck_dim=32)


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - the bench_pretrain module
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_pretrain

    allow_meta_autocast(monkeypatch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    # fused AdamW has no meta kernel; clipping and the optimiser run on the CPU in the other step tests
    monkeypatch.setattr(bench_pretrain, "clip_and_step", lambda module, optimizer: optimizer.zero_grad(set_to_none=True))
    yield bench_pretrain
    sys.modules.pop("bench_pretrain", None)


def test_the_step_overhead_runs_its_device_branches(bench, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    result = bench.step_overhead("vitmicro16", 2, 2, global_size=64, local_size=32, n_local=2, device="meta",
                                 bf16=True, readback="none", **SMALL_HEADS)
    for key in ("full_s", "backbone_s", "steady_full_s", "steady_backbone_s", "host_queue_full_s",
                "host_queue_backbone_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["steady_ratio"] == pytest.approx(result["steady_full_s"] / result["steady_backbone_s"])
    out = capsys.readouterr().out
    assert "no loss read-back" in out and "back to back" in out and "host time to queue one step" in out


def test_an_unknown_read_back_is_refused(bench) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="readback must be one of"):
        bench.step_overhead("vitmicro16", 2, 1, global_size=64, local_size=32, n_local=2, readback="later",
                            **SMALL_HEADS)


def test_the_host_proxy_times_the_step_and_its_parts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_pretrain

    threads = torch.get_num_threads()
    result = bench_pretrain.step_host_proxy("vitmicro16", repeats=2, n_local=2)
    assert torch.get_num_threads() == threads  # given back
    for part in ("full", "backbone", "views", "forward", "backward", "clip", "optimizer", "ema"):
        assert math.isfinite(result[f"{part}_ms"]) and result[f"{part}_ms"] > 0, part
    assert result["ratio"] == pytest.approx(result["full_ms"] / result["backbone_ms"])
    assert "host-time proxy" in capsys.readouterr().out
    sys.modules.pop("bench_pretrain", None)


@pytest.mark.slow
def test_the_fit_host_proxy_times_lightning_fits(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_pretrain

    from dinov3_eo.ssl.stage import SSLStage

    shipped = SSLStage._to_log
    result = bench_pretrain.fit_host_proxy("vitmicro16", steps=14, log_every_n_steps=5, repeats=1)
    assert SSLStage._to_log is shipped  # put back
    assert all(math.isfinite(v) and v > 0 for v in result.values()) and set(result) == {
        "fit_ms", "fit_every_value_logged_ms", "raw_ms"}
    assert "a Lightning fit's step" in capsys.readouterr().out
    sys.modules.pop("bench_pretrain", None)


@pytest.mark.slow
def test_the_gpu_checks_fit_logging_stage_runs_on_a_cpu(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """``gpu_pretrain_check.py``'s ``fit_logging_ab`` stage, on the CPU with a tiny model and random batches: the
    device time it will be given must not go to a slip."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import gpu_pretrain_check

    from dinov3_eo.ssl.stage import SSLStage

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):  # noqa: ANN204
            while True:
                yield {"image": torch.randn(2, 3, 64, 64), "valid": None}

    shipped = SSLStage._to_log
    result = gpu_pretrain_check.fit_logging_ab(None, "cpu", batch=2, steps=6, rounds=1, warm_up=2, data=Batches(),
                                               backbone="vitmicro16", global_crop_size=32, local_crop_size=16,
                                               n_local_crops=2, **SMALL_HEADS)  # fmt: skip
    assert SSLStage._to_log is shipped
    assert result["ratio"] > 0 and all(math.isfinite(result[k]) and result[k] > 0
                                       for k in ("logged_on_logger_steps", "every_value_every_step"))
    assert "Lightning fits" in capsys.readouterr().out
    for name in ("gpu_pretrain_check", "bench_pretrain"):
        sys.modules.pop(name, None)
