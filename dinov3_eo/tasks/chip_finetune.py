"""Fine-tuning a chip probe with its backbone: linear probing, then fine-tuning (LP-FT).

A linear probe on frozen DINOv3 features is DINOv3's own evaluation and often enough; where labelled chips are
plentiful, training the backbone too gains more. Starting that from the fitted probe rather than a random head keeps
the pretrained features from being torn up by the head's first, large gradients (Kumar et al. 2022, "Fine-tuning
can distort pretrained features"). ``classify fit ... --finetune-epochs N`` does this: the probe's head (a linear
layer on the L2-normalised ``cls`` ⊕ ``patch_mean`` embedding, exactly :meth:`ChipClassifier.scores`) and the
backbone (all of it, or its last ``--finetune-blocks``) are trained with AdamW (warm-up, then cosine decay; a
smaller learning rate for the backbone), random flips and quarter turns, cross-entropy (binary per class for a
multi-label probe; inverse-frequency weights with ``--balanced``). Each epoch is scored on the held-out chips and the
best epoch is kept; each epoch ends in a checkpoint, from which a killed run resumes. The result is an ordinary
probe whose backbone is the fine-tuned one, exported beside it in the official layout, so ``classify test``,
``predict`` and ``map`` use it unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinov3_eo.data.chips import read_chip_header
from dinov3_eo.tasks.chip_classification import ChipClassifier, held_out_score
from dinov3_eo.tasks.chip_embeddings import ChipBackbone, chip_model_input

log = logging.getLogger(__name__)


class ChipTensorDataset(Dataset):
    """Chips as the backbone reads them (:func:`~dinov3_eo.tasks.chip_embeddings.chip_model_input`, all resized to
    ``size``) with their targets: ``(image [C, S, S], patch_valid [S/p, S/p], target)``, a class id or a ``[K]`` 0/1
    row."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, *, patch_size: int, normalization: Any,
                 bands: Sequence[int] | None, size: int) -> None:  # fmt: skip
        self.headers = [read_chip_header(p) for p in paths]
        self.targets = np.asarray(targets)
        self.patch_size, self.normalization, self.bands, self.size = patch_size, normalization, bands, size

    def __len__(self) -> int:
        return len(self.headers)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        image, valid = chip_model_input(self.headers[i], patch_size=self.patch_size, normalization=self.normalization,
                                        bands=self.bands, size=self.size)  # fmt: skip
        return image, valid, torch.as_tensor(self.targets[i])


class ProbeHead(nn.Module):
    """A probe's linear head on the backbone's output: :func:`~dinov3_eo.tasks.chip_embeddings.chip_features` (each
    part L2-normalised; the patch mean over the valid patches) then ``x W^T + b``, the logits whose softmax (sigmoid,
    multi-label) :meth:`ChipClassifier.scores` gives."""

    def __init__(self, probe: ChipClassifier) -> None:
        super().__init__()
        if probe.method != "linear":
            raise ValueError("Only a linear probe can be fine-tuned with its backbone (--method linear), not a k-NN.")
        self.parts = probe.features.split("+")
        self.linear = nn.Linear(probe.weight.shape[1], probe.weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(np.asarray(probe.weight, np.float32)))
            self.linear.bias.copy_(torch.from_numpy(np.asarray(probe.bias, np.float32)))

    def forward(self, out: dict[str, Tensor], patch_valid: Tensor) -> Tensor:
        """``out``: ``forward_features``' dict; ``patch_valid`` ``[B, h, w]`` bool. Returns ``[B, K]`` logits."""
        weights = patch_valid.flatten(1).to(out["x_norm_patchtokens"].dtype)  # [B, h*w]
        patch_mean = (out["x_norm_patchtokens"] * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        if self.parts == ["image"]:  # dino.txt's image embedding: both parts normalised together
            joint = torch.cat([out["x_norm_clstoken"], patch_mean], dim=1).float()
            return self.linear(F.normalize(joint, dim=1, eps=1e-12))
        parts = [F.normalize((out["x_norm_clstoken"] if name == "cls" else patch_mean).float(), dim=1, eps=1e-12)
                 for name in self.parts]  # fmt: skip
        return self.linear(torch.cat(parts, dim=1))


@dataclass
class FinetuneSettings:
    """How :func:`finetune_chip_classifier` trains.

    Attributes:
        epochs: passes over the training chips.
        lr: peak learning rate of the backbone; head_lr: of the head (larger: it learns the new task).
        weight_decay: AdamW's, on weight matrices only (not biases or norms).
        blocks: train only the last ``blocks`` transformer blocks (and the final norm); ``None``: the whole backbone.
        warmup_fraction: share of the steps the learning rates rise linearly over, before a cosine decay to 0.
        batch_size, workers: of the data loader. augment: random flips and quarter turns (overhead imagery has no up).
        balanced: inverse-frequency class weights in the loss. seed: of the shuffling and augmentation.
        amp: bf16 autocast for the backbone.
    """

    epochs: int = 5
    lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    blocks: int | None = None
    warmup_fraction: float = 0.1
    batch_size: int = 32
    workers: int = 0
    augment: bool = True
    balanced: bool = False
    seed: int = 0
    amp: bool = False


def _trainable(model: nn.Module, blocks: int | None) -> list[nn.Parameter]:
    """The parameters trained: all, or those of the last ``blocks`` blocks and the final norm (the rest frozen)."""
    for p in model.parameters():
        p.requires_grad_(blocks is None)
    if blocks is not None:
        chosen = list(model.blocks)[len(model.blocks) - blocks :] if blocks > 0 else []
        for module in [*chosen, getattr(model, "norm", None)]:
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _groups(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"params": rest, "lr": lr, "weight_decay": 0.0}) if g["params"]]  # fmt: skip


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps to 1, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _loss_fn(probe: ChipClassifier, y: np.ndarray, balanced: bool, device: str) -> Any:
    k = len(probe.classes)
    if probe.multi_label:
        pos_weight = None
        if balanced:  # negatives / positives of each class (1 where a class has none or only positives)
            positives = np.asarray(y, bool).sum(0)
            pos_weight = torch.tensor(np.where(positives > 0, (len(y) - positives) / np.maximum(positives, 1), 1.0),
                                      dtype=torch.float32, device=device).clamp(min=1e-3)  # fmt: skip
        return lambda logits, t: F.binary_cross_entropy_with_logits(logits, t.float(), pos_weight=pos_weight)
    weight = None
    if balanced:  # scikit-learn's "balanced": n / (k * count); 0 for a class without chips
        counts = np.bincount(np.asarray(y, np.int64), minlength=k).astype(np.float64)
        weight = torch.tensor(np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0), dtype=torch.float32, device=device)
    return lambda logits, t: F.cross_entropy(logits, t.long(), weight=weight)


def chip_dataset(items: Sequence[str] | Dataset, targets: np.ndarray, *, patch_size: int, normalization: Any,
                 bands: Sequence[int] | None, size: int) -> Dataset:  # fmt: skip
    """``items`` as a dataset of ``(image, patch_valid, target)``: chip files read as :class:`ChipTensorDataset`, or
    a dataset that yields those already (the tiles of scenes:
    :class:`~dinov3_eo.tasks.tile_classification.TileTensorDataset`) as it is."""
    if isinstance(items, Dataset):
        return items
    return ChipTensorDataset(items, targets, patch_size=patch_size, normalization=normalization, bands=bands, size=size)


def dataset_probabilities(backbone: ChipBackbone, probe: ChipClassifier, dataset: Dataset, *, batch_size: int = 32,
                          workers: int = 0, amp: bool = False) -> np.ndarray:  # fmt: skip
    """``[N, K]`` ``probe``'s class probabilities of a dataset of ``(image, patch_valid, target)`` (chips or tiles as
    the backbone reads them) through ``backbone`` (:class:`ProbeHead`: what :meth:`ChipClassifier.scores` gives their
    embeddings); the backbone is left in eval mode."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    head = ProbeHead(probe).to(backbone.device)
    return _probabilities(backbone.model, head, loader, probe, backbone.device, amp)


@torch.no_grad()
def _probabilities(model: nn.Module, head: ProbeHead, loader: DataLoader, probe: ChipClassifier, device: str,
                   amp: bool) -> np.ndarray:  # fmt: skip
    model.eval()
    head.eval()
    rows = []
    for image, valid, _ in loader:
        image = image.to(device)
        with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model.forward_features(image)
        logits = head(out, valid.to(device)).double()
        rows.append((torch.sigmoid(logits) if probe.multi_label else logits.softmax(1)).cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, len(probe.classes)))


def finetune_chip_classifier(
    backbone: ChipBackbone,
    probe: ChipClassifier,
    paths: Sequence[str] | Dataset,
    y: np.ndarray,
    *,
    val: tuple[Sequence[str] | Dataset, np.ndarray] | None = None,
    settings: FinetuneSettings | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[ChipClassifier, nn.Module, list[dict[str, float]]]:
    """Fine-tune ``probe`` (a fitted linear probe) and ``backbone`` on chips ``paths`` with targets ``y`` (class ids
    ``[N]``, or ``[N, K]`` bool for a multi-label probe), embedded as the probe's were (its ``embedding`` size and
    bands; the size must be fixed, not each chip's own). ``paths`` (and ``val``'s) may instead be a dataset yielding
    ``(image, patch_valid, target)`` as the backbone reads them, with the same targets (:func:`chip_dataset`).

    Args:
        val: held-out chips and targets, scored after every epoch; the best epoch's weights are returned (without:
            the last epoch's).
        checkpoint: written (atomically) after each epoch: model, head, optimiser, the step and the best weights so
            far; an existing one is resumed from, and a finished one returns its result without training.

    Returns:
        ``(probe, backbone model, history)``: the probe with the trained head (its ``held_out_accuracy`` the best
        held-out score), the trained backbone module (on its device, eval mode), and one row per epoch (``epoch``,
        ``loss``, ``held_out``).

    Raises:
        ValueError: a k-NN probe, a probe fitted at each chip's own size, or a ``blocks`` count the backbone lacks.
    """
    from tqdm.auto import tqdm

    from dinov3_eo.inference.tta import random_dihedral

    settings = settings or FinetuneSettings()
    size = probe.embedding.get("size")
    if size is None:
        raise ValueError("Fine-tuning batches chips at one size: fit the probe with --size (e.g. 224), not 0.")
    model, device = backbone.model, backbone.device
    if settings.blocks is not None and not 0 <= settings.blocks <= len(model.blocks):
        raise ValueError(f"--finetune-blocks must lie between 0 and the backbone's {len(model.blocks)} blocks, got {settings.blocks}.")
    head = ProbeHead(probe).to(device)
    patch = int(model.patch_size)
    data = dict(patch_size=patch, normalization=backbone.normalization, bands=probe.embedding.get("bands"), size=int(size))
    train = chip_dataset(paths, y, **data)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(train, batch_size=settings.batch_size, shuffle=True, drop_last=len(train) > settings.batch_size,
                        num_workers=settings.workers, generator=generator)  # fmt: skip
    held = None
    if val is not None and len(val[0]):
        held = DataLoader(chip_dataset(val[0], val[1], **data), batch_size=settings.batch_size, num_workers=settings.workers)
    params = _trainable(model, settings.blocks)
    optimizer = torch.optim.AdamW(_groups(params, settings.lr, settings.weight_decay)
                                  + _groups(list(head.parameters()), settings.head_lr, settings.weight_decay))  # fmt: skip
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    total = settings.epochs * len(loader)
    warmup = max(1, int(settings.warmup_fraction * total))
    loss_fn = _loss_fn(probe, y, settings.balanced, device)

    initial_model, initial_head = _cpu_copy(model), _cpu_copy(head)
    state = {"epoch": 0, "step": 0, "history": [], "best": None, "best_score": -np.inf}
    path = Path(checkpoint) if checkpoint is not None else None
    run = {**{k: v for k, v in dataclasses.asdict(settings).items() if k != "workers"}, "chips": len(train),
           "classes": list(probe.classes)}  # what a checkpoint must have been written by to be resumed
    if path is not None and path.is_file():
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.get("run") != run:
            differ = sorted(k for k in run if (saved.get("run") or {}).get(k) != run[k])
            raise ValueError(f"Checkpoint {path} was written by a fine-tuning run with other {differ}; resume with the "
                             "same settings and chips, or delete it to start over.")  # fmt: skip
        model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        state = {key: saved[key] for key in state}
        log.info("Resuming the fine-tuning from %s after epoch %d.", path, state["epoch"])

    if held is not None and state["epoch"] == 0:  # epoch 0, the probe as fitted: fine-tuning must beat it to be kept
        state["best_score"] = held_out_score(probe, _probabilities(model, head, held, probe, device, settings.amp), val[1],
                                             balanced=settings.balanced)  # fmt: skip
        state["history"].append({"epoch": 0, "loss": None, "held_out": state["best_score"]})
    bar = tqdm(total=total, initial=state["step"], unit="step", desc="fine-tuning", disable=not progress)
    try:
        for epoch in range(state["epoch"], settings.epochs):
            model.train()
            head.train()
            losses = []
            for image, valid, target in loader:
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * lr_factor(state["step"], total, warmup)
                image, valid, target = image.to(device), valid.to(device), target.to(device)
                if settings.augment and image.shape[-1] == image.shape[-2]:
                    image, valid = random_dihedral(image, valid, seed=settings.seed, step=state["step"])
                with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=settings.amp):
                    out = model.forward_features(image)
                loss = loss_fn(head(out, valid), target)
                if not torch.isfinite(loss):
                    raise ValueError(f"The fine-tuning loss is {loss.item()} at step {state['step']} (epoch {epoch + 1}); "
                                     f"lower --finetune-lr. The last good checkpoint is kept{f' in {path}' if path else ''}.")  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*params, *head.parameters()], 3.0)
                optimizer.step()
                losses.append(float(loss.detach()))
                state["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            row = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan")}
            if held is not None:
                row["held_out"] = held_out_score(probe, _probabilities(model, head, held, probe, device, settings.amp), val[1],
                                                 balanced=settings.balanced)  # fmt: skip
                if row["held_out"] > state["best_score"]:
                    state["best_score"] = row["held_out"]
                    state["best"] = {"model": _cpu_copy(model), "head": _cpu_copy(head)}
            log.info("fine-tuning epoch %d: loss %.4f%s", row["epoch"], row["loss"],
                     f", held-out {row['held_out']:.4f}" if "held_out" in row else "")  # fmt: skip
            state["history"].append(row)
            state["epoch"] = epoch + 1
            if path is not None:
                _save_checkpoint(path, model, head, optimizer, generator, {**state, "run": run})
    finally:
        bar.close()
    if held is not None and state["best"] is None:  # no epoch beat the probe as fitted: keep it, and its backbone
        log.warning("No fine-tuning epoch beat the linear probe on the held-out chips (%.4f); the probe and backbone "
                    "are kept as they were.", state["best_score"])  # fmt: skip
        state["best"] = {"model": initial_model, "head": initial_head}
    if state["best"] is not None:
        model.load_state_dict(state["best"]["model"])
        head.load_state_dict(state["best"]["head"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = dataclasses.replace(probe)
    tuned.weight = head.linear.weight.detach().cpu().numpy().astype(np.float32)
    tuned.bias = head.linear.bias.detach().cpu().numpy().astype(np.float32)
    if held is not None:
        tuned.held_out_accuracy = float(state["best_score"])
    return tuned, model, list(state["history"])


def _cpu_copy(module: nn.Module) -> dict[str, Tensor]:
    """The module's weights copied to host memory (best and initial weights: kept off an accelerator's memory)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _save_checkpoint(path: Path, model: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, state: dict[str, Any]) -> None:  # fmt: skip
    from dinov3_eo.inference.writers import atomic_output

    payload = {"model": model.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
               "generator": generator.get_state(), **state}  # fmt: skip
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(payload, tmp)


__all__ = [
    "ChipTensorDataset",
    "FinetuneSettings",
    "ProbeHead",
    "chip_dataset",
    "dataset_probabilities",
    "finetune_chip_classifier",
    "lr_factor",
]
