import subprocess
import sys

import pytest

import dinov3_eo
from dinov3_eo.cli import COMMANDS, main


def test_version(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert dinov3_eo.__version__ in capsys.readouterr().out


def test_help_lists_every_command(capsys) -> None:
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "dinov3_eo", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("dinov3-eo ")


def test_a_bad_option_stops_with_one_sentence(capsys, monkeypatch) -> None:
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml"
    argv = ["pretrain", "fit", "--config", str(config), "--model.augmentation", "{brightnes: 0.1}"]
    monkeypatch.delenv("DINOV3_EO_TRACEBACK", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dinov3-eo pretrain: error: augmentation: unknown option(s) ['brightnes']" in err
    assert "Traceback" not in err
    monkeypatch.setenv("DINOV3_EO_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown option"):
        main(argv)
