"""Prompt templates that turn class names into captions of overhead imagery.

Used twice: to make captions from labels when aligning text on labelled data (EuroSAT-style folders, label
rasters), and to ensemble text embeddings for open-vocabulary queries (one embedding per template, averaged).
Every template holds exactly one ``{}``, where the class name goes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

__all__ = [
    "REMOTE_SENSING_TEMPLATES",
    "class_captions",
    "humanize_class_name",
    "load_templates",
    "random_caption",
    "validate_templates",
]

#: Built-in templates for satellite and aerial imagery (written for this project).
REMOTE_SENSING_TEMPLATES: tuple[str, ...] = (
    "a satellite image of {}.",
    "a satellite photo of {}.",
    "an aerial photo of {}.",
    "an aerial image of {}.",
    "{} seen from above.",
    "an overhead view of {}.",
    "a top-down view of {}.",
    "a bird's-eye view of {}.",
    "a remote sensing image of {}.",
    "a high-resolution satellite image of {}.",
    "a low-resolution satellite image of {}.",
    "an orthophoto showing {}.",
    "a drone photo of {}.",
    "a map tile showing {}.",
    "satellite imagery of an area with {}.",
    "an aerial view of a landscape with {}.",
    "a patch of {} in a satellite image.",
    "an earth observation image of {}.",
    "a cropped satellite scene of {}.",
    "a photo of {} taken from an airplane.",
    "{}.",
)


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Check that ``templates`` is a non-empty sequence of strings with exactly one ``{}`` each.

    Returns:
        The templates as a tuple.

    Raises:
        TypeError: if ``templates`` is a bare string or holds a non-string.
        ValueError: if it is empty or a template has no ``{}`` or more than one placeholder.
    """
    if isinstance(templates, str):
        raise TypeError(f"templates must be a sequence of strings, not the single string {templates!r}.")
    checked = tuple(templates)
    if not checked:
        raise ValueError("templates is empty; give at least one template such as 'a satellite image of {}.'.")
    for i, template in enumerate(checked):
        if not isinstance(template, str):
            raise TypeError(f"templates[{i}] is a {type(template).__name__}, not a string.")
        if template.count("{}") != 1 or len(re.findall(r"\{[^}]*\}", template)) != 1:
            raise ValueError(f"templates[{i}] = {template!r} must hold exactly one '{{}}' placeholder.")
    return checked


def load_templates(path_or_list: str | PathLike[str] | Sequence[str] | None = None) -> tuple[str, ...]:
    """Templates from a list, a file, or the built-in set.

    Args:
        path_or_list: ``None`` for :data:`REMOTE_SENSING_TEMPLATES`; a sequence of template strings; or a path to a
            ``.json`` file holding a list of strings, or to a text file with one template per line (blank lines and
            lines starting with ``#`` skipped). A string is read as a path.

    Returns:
        The validated templates as a tuple.

    Raises:
        FileNotFoundError: if the path does not exist.
        ValueError / TypeError: if a template is malformed (see :func:`validate_templates`) or the JSON is not a list.
    """
    if path_or_list is None:
        return REMOTE_SENSING_TEMPLATES
    if isinstance(path_or_list, (str, PathLike)):
        path = Path(path_or_list)
        if not path.is_file():
            raise FileNotFoundError(f"Template file {str(path)!r} does not exist.")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            loaded = json.loads(text)
            if not isinstance(loaded, list):
                raise ValueError(f"Template file {str(path)!r} must hold a JSON list of strings.")
            return validate_templates(loaded)
        lines = [line.strip() for line in text.splitlines()]
        return validate_templates([line for line in lines if line and not line.startswith("#")])
    return validate_templates(path_or_list)


def humanize_class_name(name: str) -> str:
    """A class label as words: ``"AnnualCrop" -> "annual crop"``, ``"sea_lake" -> "sea lake"``."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)  # split camelCase boundaries
    return " ".join(re.sub(r"[_\-]+", " ", spaced).split()).lower()


def class_captions(
    class_name: str,
    templates: Sequence[str] = REMOTE_SENSING_TEMPLATES,
    rng: np.random.Generator | None = None,
    *,
    k: int | None = None,
) -> list[str]:
    """Captions for one class name, one per template.

    Args:
        class_name: the class as words (see :func:`humanize_class_name` for folder-style labels).
        templates: templates with one ``{}`` each.
        rng: ``None`` for every template in order; a generator to draw ``k`` distinct templates at random.
        k: how many captions to return (default: all with ``rng=None``, one with an ``rng``).

    Returns:
        ``k`` caption strings.

    Raises:
        ValueError: if ``class_name`` is empty or ``k`` is outside ``[1, len(templates)]``.
    """
    if not class_name.strip():
        raise ValueError("class_name is empty.")
    checked = validate_templates(templates)
    if k is None:
        k = len(checked) if rng is None else 1
    if not 1 <= k <= len(checked):
        raise ValueError(f"k={k} must be between 1 and the number of templates ({len(checked)}).")
    if rng is None:
        chosen = range(k)
    else:
        chosen = rng.choice(len(checked), size=k, replace=False).tolist()
    return [checked[i].format(class_name) for i in chosen]


def random_caption(class_name: str, templates: Sequence[str], rng: np.random.Generator) -> str:
    """One caption of ``class_name`` from a template drawn with ``rng`` (labels-as-captions training)."""
    return class_captions(class_name, templates, rng, k=1)[0]
