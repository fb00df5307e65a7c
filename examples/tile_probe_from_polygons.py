"""From a scene and a few labelled polygons to a map of land-cover tiles, with the command line alone.

    python examples/tile_probe_from_polygons.py [--model backbone.pth] [--out outputs/tile_probe]

The bundled Landsat-8 scene and its four land-cover polygons (water, crop, tree, developed; ~15 ha each) as a user
would draw them. The steps are the commands a user types (run here through ``dinov3_eo.cli.main``):

1. ``classify fit --scenes`` labels the scene's 6-px tiles (180 m) that the polygons cover, embeds them and fits a
   linear probe, `C` chosen on held-out 2 x 2-tile blocks; ``--out-dir`` shows the labelled tiles and the split;
2. ``classify map`` classifies every tile of the scene: a class COG, a GeoPackage, a quick-look;
3. ``embed --tiles`` writes every tile's embedding once as GeoParquet, and ``classify fit --embeddings`` refits the
   probe from it without the backbone (what one does to try other polygons or options in seconds).

``--model`` is any backbone export (``dinov3-eo quickstart``'s ``backbone.pth``, ``dinov3-eo export``). Without it a
micro ViT with random weights is exported on the spot so that the example runs anywhere; its map then shows the
pipeline, not knowledge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dinov3_eo.cli import main as cli_main

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = SAMPLE.with_name("landsat8_224078_polygons.gpkg")


def _random_backbone(folder: Path) -> Path:
    """A random micro ViT exported with the sample's Landsat-8 DN range as its input normalisation."""
    import torch

    from dinov3_eo.models.hub import BackboneMeta, export_backbone
    from dinov3_eo.models.vit import build_backbone

    torch.manual_seed(0)
    norm = {"mean": [0.0] * 3, "std": [1.0] * 3, "low": [6000.0] * 3, "high": [14000.0] * 3, "name": "landsat8_dn"}
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, normalization=norm)
    return Path(export_backbone(build_backbone("vitmicro16", in_chans=3), folder / "micro", meta=meta)["pth"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="backbone export (default: a random micro ViT)")
    parser.add_argument("--scene", default=str(SAMPLE))
    parser.add_argument("--labels", default=str(POLYGONS), help="labelled polygons (class in 'name')")
    parser.add_argument("--tile-size", type=int, default=6, help="tile side in scene pixels (default 6 = 180 m)")
    parser.add_argument("--out", default="outputs/tile_probe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(_random_backbone(out))
    probe = out / "probe.safetensors"
    # the bundled scene declares no nodata: its 0-valued collar is given as --nodata 0
    tiles = ["--tile-size", str(args.tile_size), "--size", "32", "--nodata", "0"]

    # 1. a probe from the polygons: tiles at least 30 % covered, one class on 60 % of their labelled pixels
    assert cli_main(["classify", "fit", "--scenes", args.scene, "--labels", args.labels, "--model", model, *tiles,
                     "--min-labelled", "0.3", "--block", "2", "--val-fraction", "0.25", "-o", str(probe),
                     "--out-dir", str(out / "fit"), "--overwrite", "--quiet"]) == 0  # fmt: skip
    # 2. every tile of the scene classified (its bands are B2, B3, B4: shown as red, green, blue in reverse)
    assert cli_main(["classify", "map", args.scene, "--probe", str(probe), "-o", str(out / "map"), "--nodata", "0",
                     "--quicklook-bands", "3", "2", "1", "--overwrite", "--quiet"]) == 0  # fmt: skip
    # 3. every tile embedded once, and the probe refitted from the table
    table = out / "tiles.parquet"
    assert cli_main(["embed", args.scene, "--tiles", str(args.tile_size), "--size", "32", "--nodata", "0", "--model",
                     model, "-o", str(table), "--overwrite", "--quiet"]) == 0  # fmt: skip
    assert cli_main(["classify", "fit", "--scenes", args.scene, "--labels", args.labels, "--embeddings", str(table),
                     "--min-labelled", "0.3", "--block", "2", "--val-fraction", "0.25", "-o", str(out / "refit.safetensors"),
                     "--overwrite", "--quiet"]) == 0  # fmt: skip


if __name__ == "__main__":
    main()
