"""Spherical k-means on L2-normalised feature vectors, and the cosine silhouette that picks k.

DINOv3 features are compared by cosine similarity, so the clusters here are cones on the unit sphere: a vector
belongs to the centroid it has the largest cosine with, and a centroid is the normalised sum of its members
(Lloyd's algorithm with cosine in place of Euclidean distance). For unit vectors ``|a - b|² = 2 (1 - cos)``, so the
k-means++ seeding carries over with ``1 - cos`` as the squared distance.

Everything here is a pure function of tensors (no I/O); a ``torch.Generator`` makes it repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: rows of the [N, k] similarity matrix computed at once (memory ~ CHUNK · k floats)
CHUNK = 65_536


@dataclass(frozen=True)
class KMeansResult:
    """A spherical k-means fit.

    Attributes:
        centroids: ``[k, D]`` unit vectors, numbered by cluster size, largest first.
        labels: ``[N]`` int64 cluster of each point.
        cohesion: mean cosine between a point and its centroid (the objective, higher is tighter).
        iterations: Lloyd iterations of the best restart.
    """

    centroids: Tensor
    labels: Tensor
    cohesion: float
    iterations: int


def assign_clusters(points: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid by cosine.

    Args:
        points: ``[N, D]`` unit vectors.
        centroids: ``[k, D]`` unit vectors.

    Returns:
        ``labels [N]`` int64 and ``cosine [N]`` to the chosen centroid.
    """
    labels = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    cosine = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for start in range(0, points.shape[0], CHUNK):
        best = (points[start : start + CHUNK] @ centroids.T).max(dim=1)  # [n, k] -> [n]
        cosine[start : start + CHUNK], labels[start : start + CHUNK] = best.values, best.indices
    return labels, cosine


def kmeans_plus_plus(points: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeds on the sphere: the first a uniform draw, each next one drawn with probability proportional
    to ``1 - cos`` to its nearest seed so far (the squared chord distance, up to a factor 2).

    Args:
        points: ``[N, D]`` unit vectors, ``N >= k``.

    Returns:
        ``[k, D]`` seeds (copies of points).
    """
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    seeds = [points[first]]
    nearest = 1.0 - points @ points[first]  # [N]
    for _ in range(1, k):
        weights = nearest.clamp_min(0.0).double()
        if float(weights.sum()) <= 0.0:  # every point sits on a seed already: any point will do
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        seeds.append(points[pick])
        nearest = torch.minimum(nearest, 1.0 - points @ points[pick])
    return torch.stack(seeds)


def _lloyd(points: Tensor, centroids: Tensor, *, max_iter: int, tol: float) -> tuple[Tensor, Tensor, float, int]:
    """Lloyd iterations from ``centroids``: (centroids, labels, cohesion, iterations)."""
    k = centroids.shape[0]
    previous = -2.0
    labels, cosine = assign_clusters(points, centroids)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)  # [k, D]
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            # an empty cluster restarts at the points its neighbours fit worst, which lowers the objective least
            worst = torch.argsort(cosine)[: empty.numel()]
            sums[empty] = points[worst]
        centroids = F.normalize(sums, dim=1)
        labels, cosine = assign_clusters(points, centroids)
        cohesion = float(cosine.double().mean())
        if cohesion - previous <= tol:
            break
        previous = cohesion
    return centroids, labels, float(cosine.double().mean()), iteration


def spherical_kmeans(
    points: Tensor,
    k: int,
    *,
    n_init: int = 4,
    max_iter: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> KMeansResult:
    """Spherical k-means: ``n_init`` k-means++ restarts of Lloyd's algorithm, the most cohesive kept.

    Args:
        points: ``[N, D]`` feature vectors (L2-normalised here); ``N >= k``.
        k: number of clusters.
        n_init: restarts; max_iter: Lloyd iterations per restart; tol: stop when the mean cosine gains less.
        generator: for repeatable seeds.

    Returns:
        A :class:`KMeansResult` whose clusters are numbered by size, largest first (ties by first appearance of
        the seed), so that the same data gives the same numbering.

    Raises:
        ValueError: if ``k < 1``, there are fewer points than clusters, or a point is not finite.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if points.ndim != 2 or points.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points as an [N, D] array, got {tuple(points.shape)}.")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("k-means got non-finite feature vectors (NaN or inf).")
    points = F.normalize(points.float(), dim=1)
    best: tuple[Tensor, Tensor, float, int] | None = None
    for _ in range(max(1, n_init)):
        seeds = kmeans_plus_plus(points, k, generator=generator)
        fit = _lloyd(points, seeds, max_iter=max_iter, tol=tol)
        if best is None or fit[2] > best[2]:
            best = fit
    assert best is not None
    centroids, labels, cohesion, iterations = best
    order = torch.argsort(-torch.bincount(labels, minlength=k), stable=True)  # old ids, largest cluster first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return KMeansResult(centroids=centroids[order], labels=rank[labels], cohesion=cohesion, iterations=iterations)


def cosine_silhouette(points: Tensor, labels: Tensor, k: int) -> float:
    """Mean silhouette of a partition under the cosine distance ``1 - cos``, in ``O(N k D)``.

    For unit vectors the mean distance from ``x`` to the members of cluster ``c`` is ``1 - x · S_c / n_c`` with
    ``S_c`` the sum of the members (for ``x``'s own cluster ``x`` itself is left out: ``1 - (x · S_c - 1) /
    (n_c - 1)``), so no ``N x N`` matrix is needed. A point alone in its cluster scores 0 (as scikit-learn's).

    Args:
        points: ``[N, D]`` vectors (L2-normalised here); labels: ``[N]`` in ``[0, k)``.

    Returns:
        The silhouette in ``[-1, 1]``; higher is a better separated partition.

    Raises:
        ValueError: if fewer than two clusters are occupied.
    """
    points = F.normalize(points.double(), dim=1)
    counts = torch.bincount(labels, minlength=k).double()  # [k]
    if int((counts > 0).sum()) < 2:
        raise ValueError("The silhouette needs at least two occupied clusters.")
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype).index_add_(0, labels, points)  # [k, D]
    dots = points @ sums.T  # [N, k]
    own_n = counts[labels]  # [N]
    own_dot = dots.gather(1, labels[:, None]).squeeze(1)
    a = 1.0 - (own_dot - 1.0) / (own_n - 1.0).clamp_min(1.0)
    other = 1.0 - dots / counts.clamp_min(1.0)  # [N, k] mean distance to each cluster
    other[torch.arange(points.shape[0]), labels] = float("inf")
    other[:, counts == 0] = float("inf")
    b = other.min(dim=1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s[own_n <= 1] = 0.0
    return float(s.mean())


__all__ = ["KMeansResult", "assign_clusters", "cosine_silhouette", "kmeans_plus_plus", "spherical_kmeans"]
