import subprocess
import sys

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
