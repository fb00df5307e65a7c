"""``torchrun`` launching ``dinov3-eo pretrain fit`` as two DDP processes (gloo on the CPU): the multi-GPU path of the
README, with real process groups, a checkpoint written by one rank and an exact resumption after a kill."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, name: str, *, kill_at: int | None = None, resume: Path | None = None) -> subprocess.CompletedProcess:
    """Two processes of ``dinov3_eo pretrain fit`` for 6 steps of batch 4 each, logging every step's losses to
    ``<tmp_path>/logs/<name>/metrics.csv`` and checkpointing every 2 steps to ``<tmp_path>/<name>/``."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / name), "save_last": True, "every_n_train_steps": 2}}]
    if kill_at is not None:
        callbacks.append({"class_path": "ddp_callbacks.KillAt", "init_args": {"at": kill_at}})
    extra = {"trainer": {"devices": 2, "strategy": "ddp", "max_steps": 6, "log_every_n_steps": 1,
                         "enable_progress_bar": False, "default_root_dir": str(tmp_path / name), "callbacks": callbacks,
                         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": str(tmp_path / "logs"), "name": name, "version": ""}}},
             "model": {"preview_every_n_steps": 0}, "data": {"batch_size": 4}}  # fmt: skip
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(extra))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "dinov3_eo", "pretrain", "fit", "--config", str(CONFIG), "--config",
               str(tmp_path / f"{name}.yaml")]  # fmt: skip
    if resume is not None:
        command += ["--ckpt_path", str(resume)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")}


@pytest.mark.slow
def test_torchrun_ddp_fit_and_exact_resume_after_a_kill(tmp_path: Path) -> None:
    straight = _torchrun(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "Starting with 2 processes" in straight.stderr + straight.stdout
    checkpoint = torch.load(tmp_path / "straight" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6
    expected = _losses(tmp_path / "logs" / "straight" / "metrics.csv")
    assert sorted(expected) == [0, 1, 2, 3, 4, 5] and all(map(lambda v: v == v, expected.values()))

    killed = _torchrun(tmp_path, "killed", kill_at=4)
    assert killed.returncode != 0 and "killed before step 4" in killed.stderr
    last = tmp_path / "killed" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    resumed = _torchrun(tmp_path, "resumed", resume=last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # what the first process says, it says once: not once per rank
    assert resumed.stderr.count("Resumed mid-epoch: skipping the 4 batches") == 1
    after = _losses(tmp_path / "logs" / "resumed" / "metrics.csv")
    assert sorted(after) == [4, 5]
    for step in (4, 5):
        assert after[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
