"""``dinov3-eo pretrain|gram|highres|distill`` through LightningCLI (``fit --config x.yaml``, CLI overrides).

The stages share one module class; a stage is a config. Each entry point only picks the classes, so the YAML
``model.init_args`` map one-to-one onto the constructor signatures.
"""

from __future__ import annotations

from collections.abc import Sequence

from dinov3_eo.cli import run_lightning_cli


def pretrain_main(argv: Sequence[str]) -> int:
    """``dinov3-eo pretrain fit --config configs/pretrain/<name>.yaml``."""
    from dinov3_eo.data.datamodule import PretrainDataModule
    from dinov3_eo.ssl.module import DINOv3Pretrain

    return run_lightning_cli(DINOv3Pretrain, PretrainDataModule, argv, "dinov3-eo pretrain",
                             auto_configure_optimizers=False)


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

    return run_lightning_cli(DINOv3Distill, PretrainDataModule, argv, "dinov3-eo distill",
                             auto_configure_optimizers=False)
