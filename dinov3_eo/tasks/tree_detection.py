"""Individual trees in a canopy height model (metres): tree tops, crowns, and how well two sets of trees agree.

The maths on arrays; :mod:`dinov3_eo.tasks.tree_maps` runs it over GeoTIFFs block by block.

* **Tops** (:func:`find_tree_tops`): the variable-window local-maximum filter of Popescu & Wynne (2004). A pixel of
  height ``h >= min_height`` is a tree top when no pixel within ``radius(h)`` metres of it is taller. The window grows
  with the tree because a tall tree's crown is wide: one small fixed window splits a large crown into several tops,
  one large fixed window merges small neighbours. :class:`WindowRule`'s default, ``radius = 0.5 + 0.06 h`` metres, is
  the example rule of the ForestTools R package's variable window filter (2.3 m for a 30 m tree); fit it to your
  forest's crown width over height where you know it. The window always covers the pixel's 8 neighbours.
* **Crowns** (:func:`delineate_crowns`): a marker-controlled watershed of the inverted heights from the tops
  (scikit-image), then each crown keeps the pixels at least ``min_height`` tall, at least ``crown_fraction`` of its
  top's height (after Dalponte & Coomes 2016, whose region growing stops where the canopy falls below 0.45 of the
  seed's height: a crown ends where it drops to the ground or into a gap) and within ``max_radius`` of its top, and
  only its part connected to its top.
* **Agreement** (:func:`match_trees`): detected and reference trees (field stem maps, tops from a LiDAR CHM) paired
  one to one, nearest pairs first, within a distance and optionally a height difference; the unpaired detections
  are commission errors, the unpaired reference trees omissions (precision, recall, F1 as in the ITD benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowRule:
    """The search radius of a tree top, ``min(intercept_m + slope * height, max_radius_m)`` metres."""

    intercept_m: float = 0.5
    slope: float = 0.06
    max_radius_m: float = 10.0

    def __post_init__(self) -> None:
        if self.intercept_m < 0 or self.slope < 0 or self.max_radius_m <= 0:
            raise ValueError(f"A window radius needs intercept >= 0, slope >= 0 and max radius > 0 metres, got "
                             f"{self.intercept_m}, {self.slope} and {self.max_radius_m}.")  # fmt: skip

    def radius(self, height: np.ndarray) -> np.ndarray:
        """Search radius in metres for each height in metres (any shape)."""
        return np.minimum(self.intercept_m + self.slope * np.asarray(height, np.float64), self.max_radius_m)


def _disk_offsets(radius_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (row, col) offsets within ``radius_px`` of a pixel, itself excluded, and their squared distances: ``[K]``
    each, nearest first."""
    r = int(np.floor(radius_px))
    di, dj = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = di**2 + dj**2
    keep = (d2 <= radius_px**2) & (d2 > 0)
    order = np.argsort(d2[keep], kind="stable")
    return di[keep][order], dj[keep][order], d2[keep][order]


def find_tree_tops(chm: np.ndarray, pixel_size: float, *, rule: WindowRule = WindowRule(),
                   min_height: float = 2.0) -> np.ndarray:  # fmt: skip
    """Tree tops of a canopy height model by the variable-window local-maximum filter (module docstring).

    A pixel is a top when it is at least ``min_height`` tall and no pixel within ``rule.radius(its height)`` (and
    within its 8 neighbours) is taller; of equally tall pixels in each other's windows the first in row-major order
    is the top, so a flat crown gives one top. NaN pixels are no data: never tops, never taller.

    Args:
        chm: ``[H, W]`` heights in metres, NaN where unknown.
        pixel_size: the pixel's side in metres.

    Returns:
        ``[N, 2]`` int64 (row, col) of the tops in row-major order.
    """
    if chm.ndim != 2:
        raise ValueError(f"A canopy height model is one [H, W] band, got shape {chm.shape}.")
    if not pixel_size > 0:
        raise ValueError(f"pixel_size must be > 0 metres, got {pixel_size}.")
    heights = np.where(np.isfinite(chm), chm, -np.inf).astype(np.float64)  # [H, W]
    from scipy.ndimage import maximum_filter

    # a top is a maximum of its 3 x 3 neighbourhood first: that test is one cheap filter, and leaves few candidates
    candidate = (heights >= min_height) & (heights == maximum_filter(heights, size=3, mode="constant", cval=-np.inf))
    rows, cols = np.nonzero(candidate)
    top = heights[rows, cols]  # [C]
    reach2 = np.maximum((rule.radius(top) / pixel_size) ** 2, 2.0)  # squared radius in pixels, >= the 8 neighbours
    if not len(top):
        return np.zeros((0, 2), np.int64)
    pad = int(np.ceil(np.sqrt(reach2.max())))
    padded = np.pad(heights, pad, constant_values=-np.inf)
    alive = np.arange(len(top))  # candidates not yet beaten whose window reaches past the offsets seen so far
    is_top = np.zeros(len(top), dtype=bool)
    offsets = _disk_offsets(float(np.sqrt(reach2.max())))
    for k, (di, dj, d2) in enumerate(zip(*offsets)):
        if k % 16 == 0:  # nearest offsets first: most candidates are beaten early, or their window ends
            done = reach2[alive] < d2
            is_top[alive[done]] = True
            alive = alive[~done]
            if not len(alive):
                break
        other = padded[rows[alive] + pad + di, cols[alive] + pad + dj]  # [A]
        earlier = di < 0 or (di == 0 and dj < 0)  # row-major before the candidate: it wins a tie
        beaten = (other >= top[alive]) if earlier else (other > top[alive])
        alive = alive[~(beaten & (d2 <= reach2[alive]))]
    is_top[alive] = True
    return np.column_stack([rows[is_top], cols[is_top]]).astype(np.int64)


def delineate_crowns(chm: np.ndarray, tops: np.ndarray, pixel_size: float, *, ids: np.ndarray | None = None,
                     min_height: float = 2.0, crown_fraction: float = 0.45,
                     max_radius: float = 10.0) -> np.ndarray:  # fmt: skip
    """Crowns of the trees whose tops are given, as a label image (module docstring).

    Args:
        chm: ``[H, W]`` heights in metres, NaN where unknown.
        tops: ``[N, 2]`` (row, col) of the tops inside ``chm``.
        pixel_size: the pixel's side in metres.
        ids: ``[N]`` positive labels of the tops (default ``1..N``).
        min_height: shorter pixels belong to no crown.
        crown_fraction: a crown's pixels are at least this share of its top's height.
        max_radius: metres from its top a crown may reach.

    Returns:
        ``[H, W]`` int32: each pixel's crown label, 0 for none.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage.segmentation import watershed

    if not 0 <= crown_fraction <= 1:
        raise ValueError(f"crown_fraction must be within [0, 1], got {crown_fraction}.")
    tops = np.asarray(tops, np.int64).reshape(-1, 2)
    ids = np.arange(1, len(tops) + 1, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if len(ids) != len(tops) or (ids <= 0).any() or ids.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("ids must be one positive int32 label per top.")
    if not len(tops):
        return np.zeros(chm.shape, np.int32)
    heights = np.where(np.isfinite(chm), chm, -np.inf)
    tall = heights >= min_height  # [H, W]
    markers = np.zeros(chm.shape, np.int32)
    markers[tops[:, 0], tops[:, 1]] = np.arange(1, len(tops) + 1)  # indices + 1 into tops while flooding
    flooded = watershed(np.where(tall, -heights, 0.0), markers, mask=tall | (markers > 0))  # [H, W], 0 outside
    rows, cols = np.nonzero(flooded)
    which = flooded[rows, cols] - 1  # [P] index of each labelled pixel's top
    top_rows, top_cols = tops[which, 0], tops[which, 1]
    keep = (heights[rows, cols] >= crown_fraction * heights[top_rows, top_cols]) & (
        (rows - top_rows) ** 2 + (cols - top_cols) ** 2 <= (max_radius / pixel_size) ** 2) | (
        (rows == top_rows) & (cols == top_cols))  # fmt: skip
    rows, cols, which = rows[keep], cols[keep], which[keep]
    # each crown keeps its piece joined to its top: 4-connected components of same-crown pixels
    index = np.full(chm.shape, -1, np.int64)
    index[rows, cols] = np.arange(len(rows))
    edges = []
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])):
        both = (a >= 0) & (b >= 0)
        a, b = a[both], b[both]
        same = which[a] == which[b]
        edges.append((a[same], b[same]))
    first = np.concatenate([e[0] for e in edges])
    second = np.concatenate([e[1] for e in edges])
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(len(rows), len(rows)))
    _, component = connected_components(graph, directed=False)
    top_component = component[index[tops[:, 0], tops[:, 1]]]  # [N]
    joined = component == top_component[which]
    labels = np.zeros(chm.shape, np.int32)
    labels[rows[joined], cols[joined]] = ids[which[joined]]
    return labels


@dataclass(frozen=True)
class TreeMatch:
    """How detected trees agree with reference trees (:func:`match_trees`)."""

    pairs: np.ndarray  # [P, 2] (detected index, reference index)
    detected: int
    reference: int

    @property
    def true_positives(self) -> int:
        return len(self.pairs)

    @property
    def commission(self) -> int:
        """Detections with no reference tree: false positives."""
        return self.detected - len(self.pairs)

    @property
    def omission(self) -> int:
        """Reference trees nothing detected: false negatives."""
        return self.reference - len(self.pairs)

    @property
    def precision(self) -> float:
        return len(self.pairs) / self.detected if self.detected else float("nan")

    @property
    def recall(self) -> float:
        return len(self.pairs) / self.reference if self.reference else float("nan")

    @property
    def f1(self) -> float:
        total = self.detected + self.reference
        return 2 * len(self.pairs) / total if total else float("nan")


def match_trees(detected: np.ndarray, reference: np.ndarray, *, max_distance: float,
                detected_height: np.ndarray | None = None, reference_height: np.ndarray | None = None,
                max_height_difference: float | None = None) -> TreeMatch:  # fmt: skip
    """Pair detected with reference trees one to one, nearest pairs first.

    Every detected-reference pair within ``max_distance`` (and, with both heights and ``max_height_difference``,
    within that height difference) is a candidate; candidates are taken in order of distance (ties: detected, then
    reference index), each tree joining at most one pair.

    Args:
        detected: ``[N, 2]`` x, y of the detected trees; ``reference``: ``[M, 2]``, in the same CRS units.
        detected_height, reference_height: ``[N]``, ``[M]`` heights.
    """
    from scipy.spatial import cKDTree

    detected = np.asarray(detected, np.float64).reshape(-1, 2)
    reference = np.asarray(reference, np.float64).reshape(-1, 2)
    if max_distance <= 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}.")
    if len(detected) and len(reference):
        near = cKDTree(detected).sparse_distance_matrix(cKDTree(reference), max_distance, output_type="ndarray")
        d, r, dist = near["i"].astype(np.int64), near["j"].astype(np.int64), near["v"]
    else:
        d = r = np.zeros(0, np.int64)
        dist = np.zeros(0)
    if max_height_difference is not None and detected_height is not None and reference_height is not None:
        close = np.abs(np.asarray(detected_height, np.float64)[d] - np.asarray(reference_height, np.float64)[r])
        ok = close <= max_height_difference
        d, r, dist = d[ok], r[ok], dist[ok]
    order = np.lexsort((r, d, dist))
    used_d = np.zeros(len(detected), bool)
    used_r = np.zeros(len(reference), bool)
    pairs = []
    for k in order.tolist():
        i, j = int(d[k]), int(r[k])
        if not used_d[i] and not used_r[j]:
            used_d[i] = used_r[j] = True
            pairs.append((i, j))
    return TreeMatch(np.asarray(pairs, np.int64).reshape(-1, 2), len(detected), len(reference))


__all__ = ["TreeMatch", "WindowRule", "delineate_crowns", "find_tree_tops", "match_trees"]
