import pytest
import torch

from dinov3_eo.data.normalization import Normalization


def test_sat_preset_matches_formula() -> None:
    norm = Normalization.preset("sat493m")
    x = torch.tensor([[[0.0, 255.0]], [[51.0, 102.0]], [[255.0, 0.0]]])  # (3, 1, 2)
    out = norm(x)
    expected0 = (torch.tensor([0.0, 1.0]) - 0.430) / 0.213
    assert torch.allclose(out[0, 0], expected0)
    assert torch.allclose(out[1, 0], (torch.tensor([0.2, 0.4]) - 0.411) / 0.156)


def test_percentile_clips_and_scales_batched() -> None:
    norm = Normalization.percentile(low=[10.0, 0.0], high=[20.0, 100.0])
    x = torch.tensor([[[[0.0, 15.0, 40.0]], [[50.0, 100.0, 200.0]]]])  # (1, 2, 1, 3)
    out = norm(x)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(out[0, 1, 0], torch.tensor([0.5, 1.0, 1.0]))


def test_round_trip_and_errors() -> None:
    norm = Normalization.zscore([1.0, 2.0], [3.0, 4.0])
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="expects 2 bands"):
        norm(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="Unknown normalisation preset"):
        Normalization.preset("nope")
    with pytest.raises(KeyError, match="lacks"):
        Normalization.from_dict({"mean": [0.0]})
