import subprocess
import sys
from pathlib import Path

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


def test_every_command_retains_freed_memory_unless_switched_off(monkeypatch) -> None:
    import dinov3_eo.allocator as allocator
    import dinov3_eo.cli as cli

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    # a stand-in command module, so that only the dispatch runs
    stand_in = type("Module", (), {"main": staticmethod(lambda argv: 0)})
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: stand_in)
    monkeypatch.setitem(COMMANDS, "noop", ("anything", "main", "test only"))
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert main(["noop"]) == 0
    assert calls == [1]
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert main(["noop"]) == 0
    assert calls == [1]


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "{tmp}/missing", "-o", "{tmp}/stats.json"],
        ["export", "{tmp}/missing.ckpt", "-o", "{tmp}/backbone"],
        ["embed", "{tmp}/missing.tif", "--model", "vitmicro16", "-o", "{tmp}/features.tif"],
        ["pca", "{tmp}/missing.tif", "--model", "{tmp}/missing.pth", "-o", "{tmp}/pca.png"],
        ["segment", "predict", "{tmp}/missing.tif", "--model", "{tmp}/missing.ckpt", "-o", "{tmp}/out"],
        ["query", "{tmp}/missing.tif", "water", "--model", "{tmp}/missing.ckpt", "-o", "{tmp}/query.tif"],
        ["height", "predict", "{tmp}/missing.tif", "--model", "{tmp}/missing.ckpt", "-o", "{tmp}/chm.tif"],
        ["height", "evaluate", "{tmp}/missing.tif", "{tmp}/missing.tif", "--out-dir", "{tmp}/evaluation"],
        ["segment", "evaluate", "{tmp}/missing.tif", "{tmp}/missing.gpkg", "--out-dir", "{tmp}/evaluation"],
        ["regress", "evaluate", "{tmp}/missing.tif", "{tmp}/missing.gpkg", "--out-dir", "{tmp}/evaluation"],
        ["height", "evaluate", "{tmp}/missing.tif", "{tmp}/missing.tif", "--intervals", "{tmp}/intervals.json"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_bad_input_exits_2_with_one_sentence_in_every_command(argv, tmp_path, capsys, monkeypatch) -> None:
    """Scripts can tell bad input from a crash: every command stopped by a missing file exits with 2 (argparse's
    code for a usage error), whether the command reports the error itself or leaves it to the dispatcher."""
    monkeypatch.delenv("DINOV3_EO_TRACEBACK", raising=False)
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert f"dinov3-eo {argv[0]}" in err and "error:" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command", ["pretrain", "distill", "segment", "height", "text"])
def test_lightning_cli_commands_read_their_arguments_once(command, capsys, monkeypatch) -> None:
    """The console script's own argv is not read a second time by LightningCLI (which warned at every fit that it
    was given both), ``--help`` names the real command, and ``sys.argv`` is given back."""
    import warnings

    argv = [command, "fit", "--help"]
    monkeypatch.setattr(sys, "argv", ["dinov3-eo", *argv])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as stop:
        warnings.simplefilter("always")
        main(argv)
    assert stop.value.code == 0
    assert f"usage: dinov3-eo {command} [options] fit" in capsys.readouterr().out
    assert not [str(w.message) for w in caught if "args parameter is intended" in str(w.message)]
    assert sys.argv == ["dinov3-eo", *argv]


def test_a_key_error_with_our_message_is_one_clean_sentence(capsys, monkeypatch) -> None:
    """Checkpoints without the weights asked for and label files without the attribute asked for raise KeyError:
    exit 2 with the message as written (str(KeyError) would wrap it in quotes), not a traceback."""
    import dinov3_eo.cli as cli

    def fails(argv):  # noqa: ANN001, ANN202
        raise KeyError("VectorLabels: labels.gpkg has no attribute 'kind'; columns are ['name', 'geometry'].")

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: type("Module", (), {"main": staticmethod(fails)}))
    monkeypatch.setitem(COMMANDS, "noop", ("anything", "main", "test only"))
    monkeypatch.delenv("DINOV3_EO_TRACEBACK", raising=False)
    assert main(["noop"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinov3-eo noop: error: VectorLabels: labels.gpkg has no attribute 'kind';") and "Traceback" not in err


def test_light_subcommands_start_without_lightning() -> None:
    """``height change``, ``segment change`` and ``segment evaluate`` are routed to their own modules, which (with everything they import
    when they run) never import Lightning: seconds saved at every start; ``cluster`` (and the backbone loading and
    streaming it uses) neither."""
    from dinov3_eo.cli import SUBCOMMANDS

    modules = {module for module, _ in SUBCOMMANDS.values()} | {
        "dinov3_eo.tasks.segmentation_eval", "dinov3_eo.tasks.height_plots", "dinov3_eo.data.stack",
        "dinov3_eo.data.labels", "dinov3_eo.tasks.clustering", "dinov3_eo.tasks.features", "dinov3_eo.models.hub",
        "dinov3_eo.data.index", "dinov3_eo.inference.predict", "dinov3_eo.tasks.similarity"}  # fmt: skip
    code = f"import sys\nfor m in {sorted(modules)!r}:\n    __import__(m)\nprint('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_package_s_messages_are_shown_by_the_first_process_only(capsys, monkeypatch) -> None:
    """Without a handler Python shows warnings only: the command shows the package's INFO lines on stderr (the
    stream current when they come), and a second process of a multi-process run keeps to warnings."""
    import logging

    from dinov3_eo.cli import show_package_messages

    logger = logging.getLogger("dinov3_eo")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    show_package_messages()
    show_package_messages()  # not twice
    assert len(logger.handlers) == 1
    logging.getLogger("dinov3_eo.tasks.segmentation").info("model.num_classes = 4 from masks/.")
    assert capsys.readouterr().err == "model.num_classes = 4 from masks/.\n"
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv("LOCAL_RANK", "1")
    show_package_messages()
    logging.getLogger("dinov3_eo.data").info("repeated by every process")
    logging.getLogger("dinov3_eo.data").warning("a warning still shows")
    assert capsys.readouterr().err == "a warning still shows\n"
    monkeypatch.undo()
    logger.setLevel(logger.level)  # as it was, and the loggers' cached levels cleared


def test_a_default_data_class_is_named_only_where_nothing_names_one(tmp_path: Path) -> None:
    from dinov3_eo.cli import names_data_class, with_default_data_class

    plain, chips = tmp_path / "plain.yaml", tmp_path / "chips.yaml"
    plain.write_text("data:\n  paths: a.tif\n")
    chips.write_text("data:\n  class_path: X\n  init_args: {images: a}\n")
    assert not names_data_class(["--config", str(plain), "--data.paths", "b.tif"])
    assert names_data_class(["--config", str(chips)]) and names_data_class([f"--config={chips}"])
    assert names_data_class(["--data.class_path", "X"]) and names_data_class(["--data", "X"])
    assert not names_data_class(["--data", str(plain)])  # a data file without a class_path
    assert with_default_data_class(["fit", "--config", str(plain)], "D") == ["fit", "--data.class_path", "D", "--config", str(plain)]
    assert with_default_data_class(["fit", "--config", str(chips)], "D") == ["fit", "--config", str(chips)]
    assert with_default_data_class(["--help"], "D") == ["--help"]
    assert with_default_data_class(["fit", "--config", str(tmp_path / "missing.yaml")], "D")[:3] == ["fit", "--data.class_path", "D"]
