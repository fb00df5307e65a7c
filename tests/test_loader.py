"""ThreadedTileLoader: same batches as a DataLoader, per-thread handles, errors, resume, and a Lightning fit."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dinov3_eo.data.datamodule import DenseDataModule, PretrainDataModule
from dinov3_eo.data.datasets import TileDataset, collate_samples
from dinov3_eo.data.index import RasterIndex
from dinov3_eo.data.loader import ThreadedTileLoader
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.sampling import RandomTileSampler, Tile, TileGrid

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_polygons.gpkg"
NORM = Normalization.zscore([7800, 7300, 6600], [200, 330, 620])
TINY_PRETRAIN = dict(
    backbone="vitmicro16", dino_out_dim=256, dino_hidden_dim=128, dino_bottleneck_dim=64, ibot_out_dim=256,
    ibot_hidden_dim=128, ibot_bottleneck_dim=64, global_crop_size=64, local_crop_size=32, n_local_crops=2,
    scale_lr_with_batch=False, lr_warmup_steps=1, teacher_temp_warmup_steps=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def grid() -> TileGrid:
    return TileGrid(index=RasterIndex.build(SAMPLE, cache_dir=None), tile_size=64)


def _sampler(grid: TileGrid, length: int = 10, seed: int = 3) -> RandomTileSampler:
    return RandomTileSampler(grid=grid, length=length, seed=seed, rank=0, world_size=1)


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)
        assert torch.equal(x["valid"], y["valid"])
        assert x["bounds"] == y["bounds"] and x["path"] == y["path"]


def _live_loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ThreadedTileLoader")]


class TestThreadedTileLoader:
    def test_batches_equal_serial_and_process_dataloaders(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0, normalization=NORM)
        sampler = _sampler(grid)  # 10 tiles, batch 4: the last batch is short
        serial = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=0, collate_fn=collate_samples))
        process = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, collate_fn=collate_samples))
        loader = ThreadedTileLoader(ds, sampler=sampler, batch_size=4, num_threads=3, prefetch=1)
        threaded = list(loader)
        assert [b["image"].shape[0] for b in threaded] == [4, 4, 2] and len(loader) == 3
        _assert_same_batches(threaded, serial)
        _assert_same_batches(threaded, process)
        # a second epoch from the same loader reuses its threads and gives the same batches again
        _assert_same_batches(list(loader), serial)
        loader.close()
        assert not _live_loader_threads()

    def test_batch_is_one_plain_buffer(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0, normalization=NORM)
        batch = next(iter(ThreadedTileLoader(ds, sampler=_sampler(grid), batch_size=4)))
        assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["image"].is_contiguous() and not batch["image"].is_shared()
        assert batch["valid"].shape == (4, 64, 64) and batch["valid"].dtype == torch.bool

    def test_each_thread_reads_with_its_own_handles(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0)
        tile = Tile(0, 0, 0, 64)
        seen: dict[str, int] = {}
        barrier = threading.Barrier(2)  # both threads alive at once, so thread ids cannot be reused

        def read(name: str) -> None:
            ds[tile]
            seen[name] = id(ds.reader._handles.get()[0][0])
            barrier.wait()

        threads = [threading.Thread(target=read, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen["a"] != seen["b"]
        assert not ds.reader._handles.get()  # the main thread opened nothing

    def test_drop_last_and_length(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0)
        loader = ThreadedTileLoader(ds, sampler=_sampler(grid), batch_size=4, drop_last=True)
        assert len(loader) == 2 and [b["image"].shape[0] for b in loader] == [4, 4]
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            ThreadedTileLoader(ds, sampler=_sampler(grid), batch_size=4, num_threads=0)

    def test_reader_error_reaches_the_consumer_with_its_message(self, dataset_of_a_deleted_file: TileDataset) -> None:
        loader = ThreadedTileLoader(dataset_of_a_deleted_file, sampler=[Tile(0, 0, 0, 32)] * 4, batch_size=2)
        with pytest.raises(RuntimeError, match=r"Reading Tile\(file=0, row=0, col=0, size=32\) of .*gone.tif failed"):
            list(loader)
        loader.close()
        assert not _live_loader_threads()

    def test_error_in_a_later_batch_comes_after_the_earlier_batches(self) -> None:
        class FailsAtSeven:
            def __getitem__(self, key: int) -> dict:
                if key == 7:
                    raise ValueError(f"key {key} is broken")
                return {"image": torch.full((1,), float(key))}

        loader = ThreadedTileLoader(FailsAtSeven(), sampler=range(12), batch_size=3, num_threads=2, prefetch=2)
        got = []
        with pytest.raises(ValueError, match="^key 7 is broken$"):
            for batch in loader:
                got.append(batch["image"].flatten().tolist())
        assert got == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        loader.close()

    def test_skip_next_and_epochs_go_through_the_sampler(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0)
        sampler = _sampler(grid, length=8)
        loader = ThreadedTileLoader(ds, sampler=sampler, batch_size=2)
        full = [p for b in loader for p in b["bounds"]]
        loader.sampler.skip_next(3 * loader.batch_size)  # what the SSL stage does on a mid-epoch resume
        assert [p for b in loader for p in b["bounds"]] == full[6:]
        assert [p for b in loader for p in b["bounds"]] == full  # the skip applies to one iteration only
        loader.sampler.set_epoch(1)
        assert [p for b in loader for p in b["bounds"]] != full
        loader.close()

    def test_abandoned_iteration_then_close_leaves_no_threads(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0)
        loader = ThreadedTileLoader(ds, sampler=_sampler(grid, length=40), batch_size=2, num_threads=2, prefetch=4)
        for i, _ in enumerate(loader):
            if i == 1:
                break
        loader.close()
        assert not _live_loader_threads()


class TestDatamodules:
    def test_worker_type_picks_the_loader(self, tmp_path: Path) -> None:
        kw = dict(paths=str(SAMPLE), nodata=0, tile_size=32, tiles_per_epoch=8, batch_size=4, cache_dir=None)
        thread = PretrainDataModule(**kw, num_workers=2).train_dataloader()  # threads are the default
        process = PretrainDataModule(**kw, num_workers=2, worker_type="process").train_dataloader()
        assert isinstance(thread, ThreadedTileLoader) and thread.num_threads == 2
        assert isinstance(process, DataLoader)
        _assert_same_batches(list(thread), list(process))
        thread.close()
        # no workers means reading in the main thread, whatever the worker type
        assert isinstance(PretrainDataModule(**kw, worker_type="thread").train_dataloader(), DataLoader)
        dense = DenseDataModule(paths=str(SAMPLE), labels=str(POLYGONS), tile_size=64, num_workers=2, cache_dir=None)
        assert isinstance(dense.train_dataloader(), ThreadedTileLoader) and isinstance(dense.val_dataloader(), ThreadedTileLoader)
        dense_process = DenseDataModule(paths=str(SAMPLE), labels=str(POLYGONS), tile_size=64, num_workers=2,
                                        worker_type="process", cache_dir=None)
        assert isinstance(dense_process.train_dataloader(), DataLoader)
        with pytest.raises(ValueError, match="worker_type must be one of"):
            PretrainDataModule(**kw, worker_type="fiber")

    @pytest.mark.slow
    def test_pretrain_fit_with_thread_loader(self, tmp_path: Path) -> None:
        from dinov3_eo.ssl.module import DINOv3Pretrain

        L.seed_everything(0)
        # one batch per epoch, so the two steps are two epochs and Lightning must move the sampler on
        dm = PretrainDataModule(
            paths=str(SAMPLE), nodata=0, normalization="percentile", tile_size=96, tiles_per_epoch=4, batch_size=4,
            num_workers=2, worker_type="thread", cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        losses: list[float] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                losses.append(float(trainer.callback_metrics["loss"]))

        trainer = L.Trainer(
            max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[Record()],
        )  # fmt: skip
        trainer.fit(DINOv3Pretrain(**TINY_PRETRAIN), datamodule=dm)
        assert trainer.state.finished and len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert isinstance(trainer.train_dataloader, ThreadedTileLoader)
        assert dm.sampler.epoch == 1  # set by Lightning through loader.sampler
