"""``dinov3-eo pretrain|gram|highres|distill`` through LightningCLI (``fit --config x.yaml``, CLI overrides).

The stages share one module class; a stage is a config. Each entry point only picks the classes, so the YAML
``model.init_args`` map one-to-one onto the constructor signatures.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

#: what Lightning says at every SSL fit about a choice made on purpose: the stages' ``on_before_batch_transfer``
#: (which drops an all-valid batch's mask on the host) takes precedence over the datamodule's default hook
EXPECTED_LIGHTNING_WARNING = r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a"


def _run(model_class: type, datamodule_class: type, argv: Sequence[str], prog: str) -> int:
    import sys

    old_argv0 = sys.argv[0]
    sys.argv[0] = prog  # so that --help shows "dinov3-eo <stage>"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EXPECTED_LIGHTNING_WARNING)
            LightningCLI(
                model_class,
                datamodule_class,
                args=list(argv) or ["--help"],
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
                auto_configure_optimizers=False,
            )
    finally:
        sys.argv[0] = old_argv0
    return 0


def pretrain_main(argv: Sequence[str]) -> int:
    """``dinov3-eo pretrain fit --config configs/pretrain/<name>.yaml``."""
    from dinov3_eo.data.datamodule import PretrainDataModule
    from dinov3_eo.ssl.module import DINOv3Pretrain

    return _run(DINOv3Pretrain, PretrainDataModule, argv, "dinov3-eo pretrain")


def gram_main(argv: Sequence[str]) -> int:
    """``dinov3-eo gram fit --config configs/gram/<name>.yaml`` (Gram anchoring from a pretrain checkpoint)."""
    return pretrain_main(argv)


def highres_main(argv: Sequence[str]) -> int:
    """``dinov3-eo highres fit --config configs/highres/<name>.yaml`` (mixed resolutions, fixed Gram teacher)."""
    return pretrain_main(argv)


def distill_main(argv: Sequence[str]) -> int:
    """``dinov3-eo distill fit --config configs/distill/<name>.yaml`` (one frozen teacher, several students)."""
    from dinov3_eo.data.datamodule import PretrainDataModule
    from dinov3_eo.ssl.distill import DINOv3Distill

    return _run(DINOv3Distill, PretrainDataModule, argv, "dinov3-eo distill")
