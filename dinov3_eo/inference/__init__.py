"""Tiled, streaming inference over rasters of any size and its georeferenced outputs (COG, PNG, GeoPackage)."""

from dinov3_eo.lazy_exports import lazy_getattr

# Lazy exports: a raster job that only writes outputs (zonal statistics, evaluation, height change) imports
# ``writers`` without paying for torch, which ``predict`` and ``tta`` need.
_EXPORTS: dict[str, str] = {
    "COGWriter": "dinov3_eo.inference.writers",
    "PredictionSummary": "dinov3_eo.inference.predict",
    "TestTimeAugmented": "dinov3_eo.inference.tta",
    "TileGrid": "dinov3_eo.inference.tiling",
    "atomic_output": "dinov3_eo.inference.writers",
    "blend_weights": "dinov3_eo.inference.tiling",
    "centre_pad": "dinov3_eo.inference.tiling",
    "cosine_ramp": "dinov3_eo.inference.tiling",
    "default_colormap": "dinov3_eo.inference.writers",
    "dihedral": "dinov3_eo.inference.tta",
    "predict_raster": "dinov3_eo.inference.predict",
    "tta_views": "dinov3_eo.inference.tta",
    "undo_dihedral": "dinov3_eo.inference.tta",
    "vectorize_classes": "dinov3_eo.inference.writers",
    "window_starts": "dinov3_eo.inference.tiling",
    "write_cog": "dinov3_eo.inference.writers",
    "write_quicklook": "dinov3_eo.inference.writers",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
