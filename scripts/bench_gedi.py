"""Reading the GEDI shots over an area (``read_gedi_shots``) against reading each beam's datasets whole.

A synthetic L2A granule in GEDI's layout: eight beams of ``--shots`` shots each (a real quarter-orbit beam has up to
~300,000), each beam a track from 51.6° S to 51.6° N, with ``rh`` ``[shots, 101]`` float32 and the per-shot
datasets the filters need, in 10,000-row chunks compressed with gzip (``--compression none``: uncompressed). The
area is a box of ``--area-deg`` degrees of latitude on the equator: a map's worth of shots, as a user asks for.

1. ``read_gedi_shots`` (only the rows from the first to the last shot inside the area are read from each beam);
2. the usual script: every dataset of every beam read whole (``dataset[()]``), then masked in numpy;
3. ``read_gedi_shots`` with no area (every shot): the cost of the filters and the table over a whole granule.

Each runs in its own process (``child_process``) for its peak memory; 1 and 2 must keep the same shots.

    .venv/bin/python scripts/bench_gedi.py [--shots 100000] [--area-deg 0.2] [--compression gzip|none]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import child_entry, peak_rss_mib, run_child  # noqa: E402

BEAMS = ("BEAM0000", "BEAM0001", "BEAM0010", "BEAM0011", "BEAM0101", "BEAM0110", "BEAM1000", "BEAM1011")
PERCENTILES = (50, 75, 95, 98, 100)


def make_granule(path: Path, shots: int, compression: str, seed: int = 0) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    options = {"compression": "gzip", "compression_opts": 4} if compression == "gzip" else {}
    with h5py.File(path, "w") as f:
        for i, beam in enumerate(BEAMS):
            group = f.create_group(beam)
            lat = np.linspace(-51.6, 51.6, shots)
            top = rng.gamma(2.0, 8.0, shots).astype(np.float32)
            rh = np.minimum(top[:, None] * np.arange(101, dtype=np.float32)[None, :] / 98, top[:, None] + 1)
            columns = {
                "lat_lowestmode": lat, "lon_lowestmode": 10.0 + 0.3 * lat + 0.0015 * i, "rh": rh,
                "quality_flag": (rng.random(shots) < 0.7).astype(np.uint8),
                "degrade_flag": np.where(rng.random(shots) < 0.05, 3, 0).astype(np.uint8),
                "sensitivity": rng.uniform(0.8, 1.0, shots).astype(np.float32),
                "solar_elevation": rng.uniform(-40, 40, shots).astype(np.float32),
                "delta_time": 7.5e7 + np.arange(shots) / 242.0,
                "shot_number": (10**15 * (i + 1) + np.arange(shots)).astype(np.uint64),
            }  # fmt: skip
            for name, values in columns.items():
                chunks = (min(10_000, shots), *values.shape[1:])
                group.create_dataset(name, data=values, chunks=chunks, **options)


def package_way(granule: str, half: str) -> dict:
    import geopandas  # noqa: F401  (the imports both ways make, before the memory they use is counted)
    import h5py  # noqa: F401

    from dinov3_eo.data.gedi import ShotArea, read_gedi_shots

    imports = peak_rss_mib()
    start = time.perf_counter()
    area = None if float(half) <= 0 else ShotArea(-180, -float(half), 180, float(half))
    shots = read_gedi_shots(granule, area=area, percentiles=PERCENTILES, progress=False)
    return {"seconds": time.perf_counter() - start, "shots": len(shots.frame), "read": shots.counts["read"],
            "shot_numbers": shots.frame["shot_number"].head(100_000).tolist(),
            "rh98_sum": float(shots.frame["rh98"].sum()), "imports_mib": imports, "peak_mib": peak_rss_mib()}


def whole_way(granule: str, half: str) -> dict:
    import geopandas  # noqa: F401
    import h5py

    imports = peak_rss_mib()
    start = time.perf_counter()
    kept, rh98 = [], 0.0
    with h5py.File(granule, "r") as f:
        for beam in BEAMS:
            g = f[beam]
            lat, lon = g["lat_lowestmode"][()], g["lon_lowestmode"][()]
            ok = (np.abs(lat) <= float(half)) & (g["quality_flag"][()] == 1) & (g["degrade_flag"][()] == 0)
            ok &= g["sensitivity"][()] >= 0.95
            rh = g["rh"][()][ok][:, list(PERCENTILES)]
            ok_rows = np.flatnonzero(ok)
            good = (rh != -9999).all(axis=1)
            kept += g["shot_number"][()][ok_rows[good]].astype(np.int64).tolist()
            rh98 += float(rh[good, 3].sum())
            others = (lon[ok], g["solar_elevation"][()][ok], g["delta_time"][()][ok])  # the table's other columns
            del others
    return {"seconds": time.perf_counter() - start, "shots": len(kept), "shot_numbers": kept[:100_000],
            "rh98_sum": rh98, "imports_mib": imports, "peak_mib": peak_rss_mib()}


def run(case: str, *args: str) -> dict:
    return whole_way(*args) if case == "whole" else package_way(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=100_000, help="shots per beam")
    parser.add_argument("--area-deg", type=float, default=0.2, help="the area's height in degrees of latitude")
    parser.add_argument("--compression", choices=("gzip", "none"), default="gzip")
    if child_entry(run):
        return
    args = parser.parse_args()
    half = args.area_deg / 2
    with tempfile.TemporaryDirectory() as scratch:
        granule = Path(scratch) / "GEDI02_A_synthetic.h5"
        start = time.perf_counter()
        make_granule(granule, args.shots, args.compression)
        written = time.perf_counter() - start
        size_mib = granule.stat().st_size / 2**20
        ours = run_child(__file__, "package", granule, half)
        whole = run_child(__file__, "whole", granule, half)
        every = run_child(__file__, "package", granule, 0)
    same = ours["shot_numbers"] == whole["shot_numbers"] and abs(ours["rh98_sum"] - whole["rh98_sum"]) < 1e-3 * max(
        1.0, abs(whole["rh98_sum"]))  # fmt: skip
    result = {
        "granule": {"beams": len(BEAMS), "shots_per_beam": args.shots, "compression": args.compression,
                    "mib": round(size_mib, 1), "write_s": round(written, 1)},
        "area": {"shots_kept": ours["shots"], "package_s": round(ours["seconds"], 3),
                 "whole_read_s": round(whole["seconds"], 3),
                 "speedup": round(whole["seconds"] / ours["seconds"], 1),
                 "package_mib_above_imports": round(ours["peak_mib"] - ours["imports_mib"], 1),
                 "whole_read_mib_above_imports": round(whole["peak_mib"] - whole["imports_mib"], 1),
                 "same_shots": bool(same)},
        "every_shot": {"shots_read": every["read"], "shots_kept": every["shots"], "seconds": round(every["seconds"], 2),
                       "shots_per_s": round(every["read"] / every["seconds"]),
                       "mib_above_imports": round(every["peak_mib"] - every["imports_mib"], 1)},
    }  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
