"""Class names of DomainBed datasets, for zero-shot classifier heads.

For DomainBed's image datasets the label order is torchvision
``ImageFolder``'s: class folder names in sorted order. The lists live in
``data/class_names.json`` with their sources.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

CLASS_NAMES_FILE = Path(__file__).resolve().parent / "data" / "class_names.json"

# RotatedMNIST labels are the digits 0-9.
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@lru_cache(maxsize=None)
def _known() -> Dict[str, List[str]]:
    names = {}
    if CLASS_NAMES_FILE.is_file():
        names = {key: value for key, value in json.loads(CLASS_NAMES_FILE.read_text()).items()
                 if not key.startswith("_")}
    names["RotatedMNIST"] = [f"handwritten digit {digit}" for digit in DIGIT_NAMES]
    return names


def has_class_names(dataset: str) -> bool:
    """True when the class names of ``dataset`` are known."""
    return dataset in _known()


def class_names(dataset: str, num_classes: int) -> List[str]:
    """Return the class names of ``dataset`` in label order.

    Raises ValueError when the dataset is unknown or its known list does not
    have ``num_classes`` names.
    """
    known = _known()
    if dataset not in known:
        raise ValueError(
            f"class names of dataset {dataset!r} are unknown, so head_init='zeroshot' "
            f"cannot be used; set head_init='random' or use one of {sorted(known)}")
    names = known[dataset]
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names are known for {dataset!r} but the dataset "
            f"has {num_classes} classes; set head_init='random'")
    return list(names)
