"""Shared test set-up: offline hubs, a small thread count and deterministic seeds."""

import os

# open_clip/timm otherwise wait ~45 s on a hub that cannot answer; nothing is downloaded in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the Triton kernels of dinov3_eo.losses.logit_kernels run on CPU tensors in Triton's interpreter, which triton
# chooses when its functions are decorated: before anything imports triton
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def dataset_of_a_deleted_file(tmp_path):  # noqa: ANN001, ANN201 - pytest fixture
    """A TileDataset (32-px grid) whose only GeoTIFF was deleted after indexing: every read must fail clearly."""
    from pathlib import Path

    from dinov3_eo.data.datasets import TileDataset
    from dinov3_eo.data.index import RasterIndex
    from dinov3_eo.data.sampling import TileGrid

    sample = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
    path = tmp_path / "gone.tif"
    path.write_bytes(sample.read_bytes())
    dataset = TileDataset(grid=TileGrid(index=RasterIndex.build(path, cache_dir=None), tile_size=32))
    path.unlink()
    return dataset
