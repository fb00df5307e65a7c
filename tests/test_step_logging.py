"""Training-step values logged as CPU numbers once the backward is queued (dinov3_eo.step_logging)."""

from __future__ import annotations

import torch

from dinov3_eo.step_logging import LogsAfterBackward, LossReadback


class _Task(LogsAfterBackward):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[str, torch.Tensor, dict]] = []

    def log(self, name: str, value: torch.Tensor, **kwargs: object) -> None:  # type: ignore[override]
        self.logged.append((name, value, kwargs))


def test_values_are_logged_at_the_optimiser_step_as_host_means() -> None:
    """Two accumulated micro-batches: one log per name at the optimiser step, their mean, as a CPU tensor, with the
    whole step's batch size; the progress bar shows the names asked for."""
    task = _Task()
    task.log_after_backward({"train/loss": torch.tensor(2.0), "train/scale": torch.tensor(10.0)}, batch_size=3,
                            prog_bar=["train/loss"])  # fmt: skip
    task.log_after_backward({"train/loss": torch.tensor(4.0), "train/scale": torch.tensor(10.0)}, batch_size=5,
                            prog_bar=["train/loss"])  # fmt: skip
    assert task.logged == []  # nothing during the steps themselves
    task.on_before_optimizer_step(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    names = {name: (value, kwargs) for name, value, kwargs in task.logged}
    assert set(names) == {"train/loss", "train/scale"}
    loss, kwargs = names["train/loss"]
    assert loss.device.type == "cpu" and float(loss) == 3.0 and kwargs == {"prog_bar": True, "batch_size": 8}
    assert names["train/scale"][1]["prog_bar"] is False
    task.logged.clear()
    task.on_before_optimizer_step(None)  # type: ignore[arg-type]  # nothing pending: nothing logged
    assert task.logged == []


def test_a_readback_copies_only_when_asked_off_cuda() -> None:
    """Off CUDA the values stay where they are until :meth:`values` (a meta tensor, a GPU stand-in, is never read
    in the step); on the CPU the values are the losses'."""
    pending = LossReadback({"a": torch.empty((), device="meta")})  # would raise if copied now
    assert pending.names == ["a"]
    assert {k: float(v) for k, v in LossReadback({"a": torch.tensor(1.5), "b": torch.tensor(2)}).values().items()} == {
        "a": 1.5, "b": 2.0}


def test_micro_batch_mean_is_the_mean_per_name() -> None:
    """The one averaging both the SSL stages and the dense tasks log an accumulated step's values with."""
    from dinov3_eo.step_logging import micro_batch_mean

    steps = [{"a": torch.tensor(1.0), "b": torch.tensor(-2.0)}, {"a": torch.tensor(4.0), "b": torch.tensor(2.0)},
             {"a": torch.tensor(7.0), "b": torch.tensor(3.0)}]  # fmt: skip
    mean = micro_batch_mean(steps)
    assert set(mean) == {"a", "b"} and float(mean["a"]) == 4.0 and float(mean["b"]) == 1.0
    assert micro_batch_mean(steps[:1]) == steps[0]
