"""Hyperparameters of JPS and the same-backbone baselines, in DomainBed's format.

DomainBed's patched ``hparams_registry`` calls ``plugin_hparams(algorithm,
dataset)`` (through the ``domainbed.hparams`` entry point) and defines each
returned ``name: (default, random_fn)`` pair with its own per-name seeding,
replacing DomainBed's value of the same name. ``random_fn`` takes a
``numpy.random.RandomState``.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from .class_names import has_class_names

SMALL_IMAGE_DATASETS = ("Debug28", "RotatedMNIST", "ColoredMNIST")

HParams = Dict[str, Tuple[object, Callable]]


def clip_hparams(dataset: str) -> HParams:
    """Hyperparameters shared by every CLIP algorithm of this package."""
    head_init = "zeroshot" if has_class_names(dataset) else "random"
    hparams: HParams = {
        # Which encoder: fixed across a random search, like DomainBed's backbone flags.
        "clip_model": ("ViT-B-16", lambda r: "ViT-B-16"),
        "clip_pretrained": ("openai", lambda r: "openai"),
        "clip_image_size": (224, lambda r: 224),
        # A local weights file and cache folder, for machines without network access.
        "clip_weights_file": ("", lambda r: ""),
        "clip_cache_dir": ("", lambda r: ""),
        # "zeroshot" starts the head from CLIP text embeddings of the class names.
        "head_init": (head_init, lambda r, head_init=head_init: head_init),
        "dataset": (dataset, lambda r, dataset=dataset: dataset),
    }

    # Learning rate and weight decay ranges follow DomainBed's defaults for the
    # dataset size; AdamW applies the decay (decoupled).
    if dataset in SMALL_IMAGE_DATASETS:
        hparams["lr"] = (1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5))
        hparams["weight_decay"] = (0.0, lambda r: 0.0)
        hparams["batch_size"] = (64, lambda r: int(2 ** r.uniform(3, 7)))
    else:
        hparams["lr"] = (5e-5, lambda r: 10 ** r.uniform(-5, -3.5))
        hparams["weight_decay"] = (1e-4, lambda r: 10 ** r.uniform(-6, -2))
        if dataset == "DomainNet":
            hparams["batch_size"] = (32, lambda r: int(2 ** r.uniform(3, 5)))
        else:
            hparams["batch_size"] = (32, lambda r: int(2 ** r.uniform(3, 5.5)))
    return hparams


def jps_hparams(dataset: str) -> HParams:
    """Hyperparameters of joint parameter selection."""
    return {
        # Number of selected weights, out of 28.3M c_fc weights in ViT-B/16.
        "jps_k": (2000, lambda r: int(r.choice([1000, 2000, 3000, 5000]))),
        # Fraction of candidates the importance operator keeps per source domain.
        "jps_rho": (0.01, lambda r: float(r.choice([0.005, 0.01, 0.02, 0.05]))),
        "jps_variance": ("plain", lambda r: "plain"),
        # Minibatches per source domain for the selection gradients.
        "jps_selection_batches": (8, lambda r: int(r.choice([4, 8, 16]))),
        "jps_candidates": ("*.mlp.c_fc.weight", lambda r: "*.mlp.c_fc.weight"),
        # "dense" masks a full gradient; "sparse" computes selected entries only.
        "jps_update": ("sparse", lambda r: "sparse"),
    }


def plugin_hparams(algorithm: str, dataset: str) -> HParams:
    """Return the hyperparameters this package defines for ``algorithm``."""
    hparams = clip_hparams(dataset)
    if algorithm == "JPS":
        hparams.update(jps_hparams(dataset))
    elif algorithm not in ("CLIP_ERM", "CLIP_LinearProbe"):
        raise ValueError(
            f"jps_domainbed defines no hyperparameters for algorithm {algorithm!r}; "
            "its algorithms are JPS, CLIP_ERM and CLIP_LinearProbe")
    return hparams
