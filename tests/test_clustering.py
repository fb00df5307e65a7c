"""Unsupervised maps (``dinov3-eo cluster``): spherical k-means and its silhouette against independent references,
the feature scorer against a loop over patches, and the whole job on the real Landsat sample and its land-cover
polygons."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.features import rasterize
from sklearn.metrics import adjusted_rand_score, silhouette_score

from landsat_sample import POLYGONS, SAMPLE, load_sample, micro_vit, whole_scene_tokens
from dinov3_eo.cli import main as cli_main
from dinov3_eo.models.hub import BackboneMeta, export_backbone
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.clustering import (
    ClusterScorer,
    Clusters,
    backbone_fingerprint,
    cluster_raster,
    fit_clusters,
    normed_patch_tokens,
    sample_features,
)
from dinov3_eo.tasks.kmeans import _lloyd, assign_clusters, cosine_silhouette, kmeans_plus_plus, spherical_kmeans



def _blobs(n: int = 1200, k: int = 4, dim: int = 16, noise: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    truth = torch.randint(k, (n,), generator=g)
    return F.normalize(centres[truth] + noise * torch.randn(n, dim, generator=g), dim=1), truth


# ------------------------------------------------------------------------------------------------- k-means
def _naive_lloyd(points: np.ndarray, centroids: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm with cosine, one point at a time (no empty clusters arise from these seeds)."""
    for _ in range(iterations):
        labels = np.array([int(np.argmax([p @ c for c in centroids])) for p in points])
        new = []
        for j in range(len(centroids)):
            total = points[labels == j].sum(axis=0)
            new.append(total / np.linalg.norm(total))
        centroids = np.stack(new)
    labels = np.array([int(np.argmax([p @ c for c in centroids])) for p in points])
    return centroids, labels


def test_lloyd_matches_a_point_by_point_loop() -> None:
    points, _ = _blobs(n=300, noise=0.6)
    seeds = points[:4].clone()
    centroids, labels, cohesion, iterations = _lloyd(points, seeds, max_iter=100, tol=0.0)
    ref_c, ref_l = _naive_lloyd(points.double().numpy(), seeds.double().numpy(), iterations)
    np.testing.assert_allclose(centroids.numpy(), ref_c, atol=1e-5)
    assert (labels.numpy() == ref_l).all()
    best = points @ centroids.T  # the cohesion is the mean cosine to the nearest centroid
    assert cohesion == pytest.approx(float(best.max(dim=1).values.double().mean()), abs=1e-6)


def test_spherical_kmeans_recovers_separated_clusters_numbered_by_size() -> None:
    points, truth = _blobs(noise=0.1)
    fit = spherical_kmeans(points, 4, generator=torch.Generator().manual_seed(1))
    assert adjusted_rand_score(truth.numpy(), fit.labels.numpy()) == 1.0
    sizes = torch.bincount(fit.labels, minlength=4)
    assert (sizes[:-1] >= sizes[1:]).all()  # largest first
    torch.testing.assert_close(fit.centroids.norm(dim=1), torch.ones(4))
    labels, cosine = assign_clusters(points, fit.centroids)
    assert (labels == fit.labels).all()
    assert fit.cohesion == pytest.approx(float(cosine.double().mean()), abs=1e-6)
    again = spherical_kmeans(points, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.centroids, fit.centroids)  # same seed, same clusters, same numbering


def test_spherical_kmeans_scale_invariant_and_refusals() -> None:
    points, _ = _blobs(noise=0.1)
    scaled = points * torch.rand(points.shape[0], 1).add(0.5) * 100.0  # cosine does not see lengths
    a = spherical_kmeans(points, 4, generator=torch.Generator().manual_seed(2))
    b = spherical_kmeans(scaled, 4, generator=torch.Generator().manual_seed(2))
    assert (a.labels == b.labels).all()
    with pytest.raises(ValueError, match="at least k=5 points"):
        spherical_kmeans(points[:4], 5)
    with pytest.raises(ValueError, match="non-finite"):
        spherical_kmeans(torch.full((10, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="at least 1"):
        spherical_kmeans(points, 0)


def test_empty_cluster_restarts_and_every_cluster_is_used() -> None:
    points, _ = _blobs(noise=0.1)
    seeds = points[:1].repeat(3, 1)  # identical seeds: every point picks the first, the others start empty
    _, labels, _, _ = _lloyd(points, seeds, max_iter=50, tol=0.0)
    assert (torch.bincount(labels, minlength=3) > 0).all()


def test_kmeans_plus_plus_draws_distinct_points() -> None:
    points = F.normalize(torch.eye(5, 8), dim=1).repeat(20, 1)  # only 5 distinct points, each 20 times
    seeds = kmeans_plus_plus(points, 5, generator=torch.Generator().manual_seed(0))
    # a point already drawn has distance 0 and can never be drawn again
    assert len({tuple(s.tolist()) for s in seeds}) == 5
    assert all(any(torch.equal(s, p) for p in points[:5]) for s in seeds)


@pytest.mark.parametrize("with_singleton", [False, True])
def test_cosine_silhouette_matches_scikit_learn(with_singleton: bool) -> None:
    points, truth = _blobs(n=400, noise=0.5)
    labels = truth.clone()
    if with_singleton:
        labels[0] = 4  # a cluster of one point scores 0, as in scikit-learn
    ours = cosine_silhouette(points * 3.0, labels, 5)
    ref = silhouette_score(points.double().numpy(), labels.numpy(), metric="cosine")
    assert ours == pytest.approx(ref, abs=1e-9)
    with pytest.raises(ValueError, match="two occupied"):
        cosine_silhouette(points, torch.zeros(len(points), dtype=torch.int64), 3)


# -------------------------------------------------------------------------------------------------- features
backbone = pytest.fixture(scope="module", name="backbone")(micro_vit)
scene = pytest.fixture(scope="module", name="scene")(load_sample)


def test_normed_patch_tokens_average_the_layers_cosines(backbone: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        tokens = normed_patch_tokens(backbone, x, [1, 3])  # [2, 2D, 4, 3]
    assert tokens.shape == (2, 2 * backbone.embed_dim, 4, 3)
    torch.testing.assert_close(tokens.norm(dim=1), torch.ones(2, 4, 3))
    with torch.no_grad():
        per_layer = [F.normalize(t, dim=1) for t in backbone.get_intermediate_layers(x, n=[1, 3], reshape=True, norm=True)]
    a, b = (0, slice(None), 1, 2), (1, slice(None), 3, 0)
    mean_cos = sum(float(t[a] @ t[b]) for t in per_layer) / 2
    assert float(tokens[a] @ tokens[b]) == pytest.approx(mean_cos, abs=1e-5)


def test_cluster_scorer_is_the_nearest_centroid_of_each_patch(backbone: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens = normed_patch_tokens(backbone, x)[0]  # [D, 4, 4]
    centroids = F.normalize(torch.randn(5, backbone.embed_dim), dim=1)
    scorer = ClusterScorer(backbone, centroids)
    with torch.no_grad():
        scores = scorer(x)[0]  # [5, 64, 64]
        odd = scorer(x[..., :60, :57])  # centred padding, cropped back
    assert scores.shape == (5, 64, 64) and odd.shape == (1, 5, 60, 57)
    assert scores.abs().max() <= 1.0 + 1e-5
    for i in range(4):
        for j in range(4):
            expected = int((centroids @ tokens[:, i, j]).argmax())
            # at a 2 x 2 block in the middle of a patch, bilinear upsampling is within the patch's own cosines
            assert int(scores[:, 16 * i + 8, 16 * j + 8].argmax()) == expected
    wrong = ClusterScorer(backbone, torch.randn(5, 7))
    with pytest.raises(ValueError, match="7 dimensions"):
        wrong(x)


def test_fingerprint_tells_backbones_apart(backbone: torch.nn.Module) -> None:
    torch.manual_seed(1)
    other = build_backbone("vitmicro16", in_chans=3)
    assert backbone_fingerprint(backbone) == backbone_fingerprint(backbone)
    assert backbone_fingerprint(other) != backbone_fingerprint(backbone)


# ------------------------------------------------------------------------------------------ real scene
def test_samples_come_from_fully_valid_patches_only(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    # a copy whose left half is nodata: no sample may come from there, so every sample is a right-half patch's
    array = scene["array"].copy()
    array[:, :, :224] = 0
    with rasterio.open(SAMPLE) as src:
        profile = {**src.profile, "nodata": 0}
    half = tmp_path / "half.tif"
    with rasterio.open(half, "w", **profile) as dst:
        dst.write(array)
    samples = sample_features(backbone, [half], normalization=scene["normalization"], window=1024, progress=False)
    # one window holds the whole raster, so each token has the same context as in one forward pass over it
    valid = (array > 0).all(axis=0)
    tokens = whole_scene_tokens(backbone, {**scene, "array": array, "valid": valid}).flatten(1).T  # [58 * 28, D]
    full = (F.avg_pool2d(torch.from_numpy(valid).float()[None, None], 16) >= 1.0).flatten()
    expected = tokens[full]
    assert samples.shape == expected.shape
    # the same set of vectors, order aside: each sample's nearest token, each token matched once
    match = torch.cdist(samples.double(), expected.double()).argmin(dim=1)
    assert len(set(match.tolist())) == len(expected)
    torch.testing.assert_close(samples, expected[match], atol=1e-4, rtol=0)
    assert int(full.reshape(58, 28)[:, :14].sum()) == 0  # and none of them from the nodata half


def test_clusters_separate_the_land_cover_of_the_real_scene(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    clusters = fit_clusters(backbone, [SAMPLE], 4, normalization=scene["normalization"], nodata=0, progress=False)
    assert clusters.k == 4 and clusters.samples > 1000
    assert sum(clusters.shares) == pytest.approx(1.0) and clusters.shares == sorted(clusters.shares, reverse=True)
    result = cluster_raster(backbone, clusters, SAMPLE, tmp_path, nodata=0, polygons=True, progress=False)
    with rasterio.open(result.classes) as src:
        labels = src.read(1)
        assert src.nodata == 255 and json.loads(src.tags()["class_names"]) == clusters.class_names
        assert src.colormap(1)[0][:3] != src.colormap(1)[1][:3]
        assert (src.crs, src.transform) == (rasterio.open(SAMPLE).crs, scene["transform"])
    assert ((labels == 255) == ~scene["valid"]).all()  # the collar is nodata, every valid pixel has a cluster
    assert result.pixels == tuple(np.bincount(labels[labels != 255], minlength=4))
    assert result.hectares == pytest.approx(tuple(p * 0.09 for p in result.pixels))  # 30 m pixels
    # each of the four hand-drawn land covers falls (almost) wholly into one cluster, a different one for each
    majority = {}
    for _, row in gpd.read_file(POLYGONS).iterrows():
        inside = rasterize([row.geometry], out_shape=scene["shape"], transform=scene["transform"]).astype(bool)
        counts = np.bincount(labels[inside & scene["valid"]], minlength=4)
        majority[row["name"]] = int(counts.argmax())
        assert counts.max() / counts.sum() >= 0.8, (row["name"], counts)
    assert len(set(majority.values())) == 4, majority
    polygons = result.to_geodataframe()
    assert polygons.area.sum() == pytest.approx(sum(result.pixels) * 900.0)
    array = result.to_xarray()
    assert array.name == "clusters" and array.attrs["class_names"] == clusters.class_names
    assert np.array_equal(array.values, labels) and array.rio.crs == rasterio.open(SAMPLE).crs
    assert array.rio.transform() == scene["transform"]
    assert result.quicklook is not None and result.quicklook.stat().st_size > 0


def test_several_k_keep_the_best_silhouette_and_centroids_round_trip(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    clusters = fit_clusters(backbone, [SAMPLE], [3, 4, 6], normalization=scene["normalization"], nodata=0,
                            max_windows=2, max_samples=2000, progress=False)  # fmt: skip
    assert set(clusters.candidates) == {3, 4, 6}
    best = max(clusters.candidates, key=lambda k: clusters.candidates[k]["silhouette"])
    assert clusters.k == best and clusters.silhouette == clusters.candidates[best]["silhouette"]
    path = clusters.save(tmp_path / "c.safetensors")
    loaded = Clusters.load(path)
    assert torch.equal(loaded.centroids, clusters.centroids)
    assert loaded.metadata() == clusters.metadata()
    with pytest.raises(FileExistsError):
        clusters.save(path)
    # the same data and seed give the same centroids
    again = fit_clusters(backbone, [SAMPLE], [3, 4, 6], normalization=scene["normalization"], nodata=0,
                         max_windows=2, max_samples=2000, progress=False)  # fmt: skip
    assert torch.equal(again.centroids, clusters.centroids)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="another backbone"):
        cluster_raster(build_backbone("vitmicro16", in_chans=3), loaded, SAMPLE, tmp_path, progress=False)


def test_load_refuses_what_is_not_a_centroids_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="does not exist"):
        Clusters.load(tmp_path / "missing.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a centroids file"):
        Clusters.load(tmp_path / "other.safetensors")
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="Cannot read"):
        Clusters.load(tmp_path / "text.safetensors")


# ------------------------------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def exported(backbone: torch.nn.Module, scene: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=backbone.embed_dim,
                        normalization=scene["normalization"].to_dict(), gsd=30.0)  # fmt: skip
    return export_backbone(backbone, tmp_path_factory.mktemp("bb") / "backbone", meta=meta)["pth"]


def test_cli_fits_maps_and_maps_a_second_scene_into_the_same_clusters(exported: Path, scene: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "out"
    args = [str(SAMPLE), "--model", str(exported), "-o", str(out), "-k", "3", "5", "--nodata", "0", "--quiet"]
    assert cli_main(["cluster", *args]) == 0
    printed = capsys.readouterr().out
    assert "<- kept" in printed and "silhouette" in printed
    summary = json.loads((out / "clusters.json").read_text())
    k = summary["k"]
    assert k in (3, 5) and set(summary["candidates"]) == {"3", "5"}
    scene_summary = summary["scenes"][str(SAMPLE)]
    assert sum(scene_summary["pixels"]) == int(scene["valid"].sum())
    first = out / f"{SAMPLE.stem}_clusters.tif"
    assert first.exists() and (out / f"{SAMPLE.stem}_clusters.png").exists()
    # an existing output stops the run before any work, with exit code 2
    assert cli_main(["cluster", *args]) == 2
    assert "already exists" in capsys.readouterr().err
    # the same scene under another name, mapped with the saved centroids: the same map
    copy = tmp_path / "again.tif"
    copy.write_bytes(SAMPLE.read_bytes())
    out2 = tmp_path / "out2"
    assert cli_main(["cluster", str(copy), "--model", str(exported), "-o", str(out2), "--nodata", "0", "--quiet",
                     "--centroids", str(out / "centroids.safetensors"), "--no-quicklook"]) == 0  # fmt: skip
    with rasterio.open(first) as a, rasterio.open(out2 / "again_clusters.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
    assert not (out2 / "centroids.safetensors").exists() and not (out2 / "again_clusters.png").exists()
    # maps into the same clusters go straight into the from -> to transitions (here: nothing changed)
    from dinov3_eo.tasks.class_change import class_transitions

    report = class_transitions(first, out2 / "again_clusters.tif")
    assert report["transitions"] == []
    assert set(report["classes"]) == {f"cluster {i}" for i in range(k)}


def test_cli_refuses_bad_input(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--model", str(exported), "-o", str(tmp_path / "o"), "--quiet"]
    assert cli_main(["cluster", str(tmp_path / "missing.tif"), *base]) == 2
    assert "missing.tif" in capsys.readouterr().err
    assert cli_main(["cluster", str(SAMPLE), *base, "--bands", "1", "2"]) == 2
    assert "takes 3" in capsys.readouterr().err
    assert cli_main(["cluster", str(SAMPLE), *base, "-k", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert cli_main(["cluster", str(SAMPLE), *base, "--centroids", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["cluster", str(SAMPLE), *base, "--centroids", str(tmp_path / "c.safetensors"), "-k", "4"]) == 2
    assert "leave out -k" in capsys.readouterr().err


def test_features_all_alike_are_named_not_a_crash(backbone: torch.nn.Module, scene: dict, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with rasterio.open(SAMPLE) as src:
        profile = src.profile
    flat = tmp_path / "flat.tif"
    with rasterio.open(flat, "w", **profile) as dst:
        dst.write(np.full((3, profile["height"], profile["width"]), 7000, dtype=np.uint16))
    with caplog.at_level("WARNING"):
        clusters = fit_clusters(backbone, [flat], [3, 4], normalization=scene["normalization"], max_windows=2,
                                progress=False)  # fmt: skip
    assert "only 1 distinct cluster" in caplog.text and "normalisation" in caplog.text
    assert clusters.silhouette is None and all(c["silhouette"] is None for c in clusters.candidates.values())


def test_an_alpha_band_is_the_mask_not_an_input(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    """An RGBA GeoTIFF (the collar transparent, no nodata value) maps as the RGB scene with --nodata 0 does."""
    with rasterio.open(SAMPLE) as src:
        profile = {**src.profile, "count": 4, "photometric": "RGB", "alpha": "YES"}
    alpha = np.where(scene["valid"], 65535, 0).astype(np.uint16)
    rgba = tmp_path / "rgba.tif"
    with rasterio.open(rgba, "w", **profile) as dst:
        dst.write(np.concatenate([scene["array"], alpha[None]]))
    kwargs = {"normalization": scene["normalization"], "max_windows": 2, "progress": False}
    from_alpha = fit_clusters(backbone, [rgba], 4, **kwargs)
    from_nodata = fit_clusters(backbone, [SAMPLE], 4, nodata=0, **kwargs)
    torch.testing.assert_close(from_alpha.centroids, from_nodata.centroids)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = cluster_raster(backbone, from_alpha, rgba, tmp_path / "a", progress=False)
    b = cluster_raster(backbone, from_nodata, SAMPLE, tmp_path / "b", nodata=0, quicklook=False, progress=False)
    with rasterio.open(a.classes) as x, rasterio.open(b.classes) as y:
        assert np.array_equal(x.read(1), y.read(1))
