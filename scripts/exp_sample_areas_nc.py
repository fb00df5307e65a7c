"""Real-data experiment: class areas from a stratified sample of a real map (``dinov3-eo sample`` then ``segment
evaluate``'s error-adjusted areas), North Carolina Landsat-7, against the true areas.

Data (../shared/data/nc_landsat7, GPL-3.0, read in place, never copied): the 5-band Landsat-7 stack and the 7-class
land-class map ``strata.tif`` (warped onto the image grid, as in ``exp_segment_nc.py``), which is the truth here:
every pixel's class is known, so every area is.

The map: a random forest (scikit-learn, 100 trees) on the five spectral values of 2,000 random pixels of the west
half, predicting every pixel: a real map with real, class-dependent errors. Then, ``--draws`` times for each design,
``stratified_sample`` draws ``--points`` pixels of the map (``proportional`` without a floor, ``proportional`` with at
least 30 a class, ``equal``, and ``proportional`` with 2-px buffer strata around the three rare classes), the truth
at each point plays the person who labels it, and ``design_estimates`` gives each class's error-adjusted area with
its 95 % interval (for the designs without buffers: Olofsson's estimator, ``segment evaluate``'s, exactly). Reported per class: the true area, the map's own pixel
count and its error, and per design the estimates' mean absolute error and how often the interval holds the truth.

    .venv/bin/python scripts/exp_sample_areas_nc.py [--points 350] [--draws 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_segment_nc import DATA, IGNORE, load_scene  # noqa: E402

NAMES = ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]
#: (allocation, minimum a stratum, buffer strata (class id, pixels)): agriculture, water and sediment ringed by 2 px
DESIGNS = (("proportional", 0, ()), ("proportional", 30, ()), ("equal", 0, ()),
           ("proportional", 30, ((1, 2), (5, 2), (6, 2))))


def make_map(image: np.ndarray, truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[H, W]`` uint8 classes of a random forest trained on 2,000 west-half pixels; 255 where there is no truth."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    known = truth != IGNORE
    west = known.copy()
    west[:, truth.shape[1] // 2 :] = False
    train = rng.choice(np.flatnonzero(west.ravel()), size=2000, replace=False)
    pixels = image.reshape(len(image), -1).T
    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=2)
    forest.fit(pixels[train], truth.ravel()[train])
    mapped = np.full(truth.size, 255, np.uint8)
    mapped[known.ravel()] = forest.predict(pixels[known.ravel()])
    return mapped.reshape(truth.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=350)
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()

    from dinov3_eo.inference.writers import write_cog
    from dinov3_eo.tasks.sample_design import design_estimates, stratified_sample

    start = time.perf_counter()
    image, _, truth = load_scene()
    mapped = make_map(image, truth)
    k = len(NAMES)
    with rasterio.open(DATA / "landsat_multiband.tif") as src:
        crs, transform = src.crs, src.transform
    hectares = abs(transform.a * transform.e) / 10_000
    known = truth != IGNORE
    true_px = np.bincount(truth[known], minlength=k)
    map_px = np.bincount(mapped[known], minlength=k)
    print(f"{known.sum():,} pixels ({known.sum() * hectares:,.0f} ha); the map's pixel accuracy "
          f"{(mapped[known] == truth[known]).mean():.3f} ({time.perf_counter() - start:.1f} s)")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "map.tif"
        write_cog(path, mapped, crs=crs, transform=transform, nodata=255, class_names=NAMES)
        for design in DESIGNS:
            allocation, floor, buffers = design
            estimates, halves, accuracy_held = [], [], []
            for seed in range(args.draws):
                points = stratified_sample(path, n=args.points, allocation=allocation, min_per_stratum=floor,
                                           buffers=buffers, seed=seed)  # fmt: skip
                rows, cols = rasterio.transform.rowcol(transform, points.geometry.x, points.geometry.y)
                labelled = truth[np.asarray(rows), np.asarray(cols)]
                area = design_estimates(points["stratum_id"], points["class_id"], labelled,
                                        {d["stratum_id"]: d["pixels"] for d in points.attrs["design"]},
                                        dict(enumerate(map_px.tolist())), NAMES, pixel_area=hectares,
                                        finite_population=False)  # fmt: skip
                estimates.append([area["classes"][n]["estimated_area"] for n in NAMES])
                halves.append([area["classes"][n]["estimated_area_ci"] for n in NAMES])
                true_accuracy = (mapped[known] == truth[known]).mean()
                accuracy_held.append(abs(area["overall_accuracy"] - true_accuracy) <= area["overall_accuracy_ci"])
            estimates, halves = np.array(estimates), np.array(halves)
            truth_ha = true_px * hectares
            held = np.abs(estimates - truth_ha) <= halves  # NaN intervals (a class with < 2 points) never hold
            results[design] = (np.nanmean(np.abs(estimates - truth_ha), axis=0), held.mean(axis=0),
                                            float(np.mean(accuracy_held)))  # fmt: skip
    print(f"\n{args.draws} draws of {args.points} points; per class: true area, the map's pixel count (error), and "
          "per design the estimates' mean absolute error / how often the 95 % interval holds the truth")
    label = lambda d: d[0] + (f" >={d[1]}" if d[1] else "") + (" +buffers" if d[2] else "")  # noqa: E731
    header = f"{'class':<12}{'true ha':>9}{'map ha':>9}{'map err':>9}"
    for design in DESIGNS:
        header += f"{label(design):>28}"
    print(header)
    for i, name in enumerate(NAMES):
        line = f"{name:<12}{true_px[i] * hectares:>9,.0f}{map_px[i] * hectares:>9,.0f}{(map_px[i] - true_px[i]) * hectares:>+9,.0f}"
        for design in DESIGNS:
            error, held, _ = results[design]
            line += f"{f'{error[i]:,.0f} / {100 * held[i]:.0f} %':>28}"
        print(line)
    print("overall accuracy interval holds: " + ", ".join(f"{label(d)} {100 * results[d][2]:.1f} %" for d in DESIGNS))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
