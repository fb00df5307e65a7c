"""Shared test set-up: offline hubs, a small thread count and deterministic seeds."""

import os

# open_clip/timm otherwise wait ~45 s on a hub that cannot answer; nothing is downloaded in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
