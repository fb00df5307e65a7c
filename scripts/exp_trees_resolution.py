"""How fine must a canopy height map be to count its trees? Tree tops on real LiDAR CHMs against the same CHMs made
coarser, smoother or noisier, as a predicted map would be.

Data: the 12 NEON plots of ../shared/data/neon_chm (Lower Teakettle, mixed conifer, 40 x 40 m each at 1 m, CC0) and
the New Zealand CHM of ../shared/data/lidar_chm_nz (278 x 195 m at 1 m, GPL: read here only). The reference trees
are the tops ``height trees`` finds on each 1 m LiDAR CHM (``--smooth 1``). Each variant of the CHM is searched the
same way (the default window, 0.5 + 0.06 h m) and its tops matched one to one with the reference's within 3 m
(``height trees evaluate``'s rule):

* ``1 m, no smoothing``: the same map without the 1 m Gaussian;
* ``1 m, blurred σ 1.5 m``: a map as smooth as a model's output tends to be;
* ``1 m + N(0, 2 m)``: pixel errors of a good predicted map (then smoothed 1 m, as the reference);
* ``2 m`` and ``3 m``: the CHM averaged to coarser pixels (then smoothed 1 m).

The reference is this package's own detector on the LiDAR map, not a field stem map: the numbers say how much of what
the detector finds at 1 m it still finds in a coarser or smoother map, not how many real trees it finds.

    .venv/bin/python scripts/exp_trees_resolution.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from dinov3_eo.tasks.tree_detection import find_tree_tops, match_trees
from dinov3_eo.tasks.tree_maps import smooth_heights

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHMS = [*sorted((DATA / "neon_chm" / "chm").glob("TEAK_*_CHM.tif")), DATA / "lidar_chm_nz" / "CHM.tif"]


def tops_xy(chm: np.ndarray, pixel: float, smooth_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Tops of ``chm`` (searched on the smoothed map) as x, y metres of pixel centres from the map's corner, and heights."""
    search = smooth_heights(chm, smooth_m / pixel) if smooth_m > 0 else chm
    tops = find_tree_tops(search, pixel, min_height=2.0)
    xy = (tops[:, ::-1] + 0.5) * pixel
    return xy, chm[tops[:, 0], tops[:, 1]]


def main() -> None:
    rng = np.random.default_rng(0)
    variants = ["1 m, no smoothing", "1 m, blurred σ 1.5 m", "1 m + N(0, 2 m)", "2 m", "3 m"]
    totals = {v: np.zeros(3, int) for v in variants}  # matched, detected, reference
    errors: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    for site in ("TEAK", "NZ"):
        paths = [p for p in CHMS if (p.name.startswith("TEAK")) == (site == "TEAK")]
        per_site = {v: np.zeros(3, int) for v in variants}
        n_ref = 0
        for path in paths:
            with rasterio.open(path) as src:
                chm = src.read(1, masked=True).astype(np.float64).filled(np.nan)
                coarse = {f: src.read(1, out_shape=(src.height // f, src.width // f), resampling=Resampling.average,
                                      masked=True).astype(np.float64).filled(np.nan) for f in (2, 3)}  # fmt: skip
            ref_xy, ref_h = tops_xy(chm, 1.0, 1.0)
            n_ref += len(ref_xy)
            noisy = chm + rng.normal(0, 2.0, chm.shape)
            found = {
                "1 m, no smoothing": tops_xy(chm, 1.0, 0.0),
                "1 m, blurred σ 1.5 m": tops_xy(smooth_heights(chm, 1.5), 1.0, 0.0),
                "1 m + N(0, 2 m)": tops_xy(noisy, 1.0, 1.0),
                "2 m": tops_xy(coarse[2], 2.0, 1.0),
                "3 m": tops_xy(coarse[3], 3.0, 1.0),
            }
            for name, (xy, h) in found.items():
                inside = (xy[:, 0] < chm.shape[1]) & (xy[:, 1] < chm.shape[0])
                m = match_trees(xy[inside], ref_xy, max_distance=3.0)
                per_site[name] += [m.true_positives, m.detected, m.reference]
                errors[name].append(h[inside][m.pairs[:, 0]] - ref_h[m.pairs[:, 1]])
        print(f"\n{site}: {len(paths)} CHM(s), {n_ref} reference tops")
        print(f"{'variant':24s} {'found':>6s} {'precision':>9s} {'recall':>7s} {'F1':>6s}")
        for name in variants:
            tp, det, ref = per_site[name]
            totals[name] += per_site[name]
            print(f"{name:24s} {det:6d} {tp / det:9.3f} {tp / ref:7.3f} {2 * tp / (det + ref):6.3f}")
    print("\nmatched trees' height, variant - reference (both sites):")
    for name in variants:
        e = np.concatenate(errors[name])
        print(f"{name:24s} bias {e.mean():+.2f} m, RMSE {np.sqrt(np.mean(e**2)):.2f} m")


if __name__ == "__main__":
    main()
