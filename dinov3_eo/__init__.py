"""dinov3_eo: the DINOv3 self-supervised method for Earth observation."""

__version__ = "0.1.0"
