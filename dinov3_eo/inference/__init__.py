"""Tiled, streaming inference over rasters of any size and its georeferenced outputs (COG, PNG, GeoPackage)."""

from dinov3_eo.inference.predict import PredictionSummary, predict_raster
from dinov3_eo.inference.tiling import TileGrid, blend_weights, centre_pad, cosine_ramp, window_starts
from dinov3_eo.inference.tta import TestTimeAugmented, dihedral, tta_views, undo_dihedral
from dinov3_eo.inference.writers import (
    COGWriter,
    atomic_output,
    default_colormap,
    vectorize_classes,
    write_cog,
    write_quicklook,
)

__all__ = [
    "COGWriter",
    "PredictionSummary",
    "TestTimeAugmented",
    "TileGrid",
    "atomic_output",
    "blend_weights",
    "centre_pad",
    "cosine_ramp",
    "default_colormap",
    "dihedral",
    "predict_raster",
    "tta_views",
    "undo_dihedral",
    "vectorize_classes",
    "window_starts",
    "write_cog",
    "write_quicklook",
]
