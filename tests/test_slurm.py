"""The SLURM template: its command line reaches LightningCLI with the node and GPU counts SLURM gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
SAMPLE = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_sbatch_template_runs_stats_once_and_hands_slurm_s_counts_to_the_fit(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nexec "$@"\n')  # one task, here
    (fake / "srun").chmod(0o755)
    stats = tmp_path / "stats" / "archive.json"
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4", "NODATA": "0", "STATS": str(stats),
           "DINOV3_EO": str(Path(sys.executable).parent / "dinov3-eo")}
    command = ["bash", str(TEMPLATE), "configs/pretrain/vits16_gpu.yaml", str(SAMPLE), "--print_config"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(json.loads(stats.read_text())["mean"]) == 3  # the band statistics, computed once before srun
    printed = run.stdout[run.stdout.index("# lightning"):]  # after the statistics' own report
    config = yaml.safe_load(printed)
    assert config["trainer"]["num_nodes"] == 2 and str(config["trainer"]["devices"]) == "4"  # devices: int | str
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["precision"] == "bf16-mixed"
    assert config["data"]["paths"] == str(SAMPLE) and config["data"]["stats"] == str(stats)
    assert config["data"]["nodata"] == 0
    stamp = stats.stat().st_mtime_ns
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and stats.stat().st_mtime_ns == stamp  # a requeued job reuses them


def test_the_template_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(TEMPLATE)]).returncode == 0
