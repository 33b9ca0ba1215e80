"""DomainBed algorithms on a CLIP image encoder: JPS and two baselines.

- ``JPS`` selects a sparse mask of encoder weights from source-domain
  gradients before any weight moves, then trains only the mask and the head.
- ``CLIP_ERM`` fine-tunes the whole encoder and the head (ERM).
- ``CLIP_LinearProbe`` trains the head on the frozen encoder.

All three share the featurizer, the head options, the optimizer (AdamW) and
the checkpoint format, so differences in DomainBed's tables come from what
is trained. DomainBed finds them through the ``domainbed.algorithms`` entry
points that the patch in ``patches/`` teaches it to read.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from domainbed.algorithms import Algorithm
except ImportError as error:  # pragma: no cover - exercised only without DomainBed
    raise ImportError(
        "jps_domainbed.algorithms needs DomainBed on the Python path; install the "
        "pinned, patched copy with `python -m jps_domainbed.install_domainbed`") from error

from .class_names import class_names
from .clip_featurizer import (CLIPSpec, PretrainedWeightsNotFoundError, build_clip_featurizer,
                              zero_shot_head_weights)
from .mask import SparseMask
from .masked_training import apply_mask, check_values, weights_hash
from .selection import SelectionConfig, find_candidates, select_mask

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "jps-domainbed-checkpoint/1"

UPDATE_IMPLEMENTATIONS = ("sparse", "dense")

CLIP_HPARAMS_HINT = (
    "In DomainBed these come from the hparams clip_model (model name), clip_pretrained "
    "(pretrained), clip_image_size (image_size), clip_weights_file (weights_file) and "
    "clip_cache_dir (cache_dir)")
JPS_HPARAMS_HINT = (
    "In DomainBed these come from the hparams jps_k (k), jps_rho (rho), jps_variance "
    "(variance), jps_selection_batches (selection_batches), jps_candidates (candidate "
    "patterns) and jps_update")

REQUIRED_HPARAMS = ("lr", "weight_decay", "clip_model", "clip_pretrained", "clip_image_size",
                    "head_init")

Minibatches = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def clip_spec_from_hparams(hparams: Mapping[str, object]) -> CLIPSpec:
    """Return the CLIPSpec that the ``clip_*`` hyperparameters describe."""
    return CLIPSpec(
        model_name=str(hparams["clip_model"]),
        pretrained=str(hparams["clip_pretrained"]),
        image_size=int(hparams["clip_image_size"]),
        weights_file=hparams.get("clip_weights_file") or None,
        cache_dir=hparams.get("clip_cache_dir") or None,
    )


def selection_config_from_hparams(hparams: Mapping[str, object]) -> SelectionConfig:
    """Return the SelectionConfig that the ``jps_*`` hyperparameters describe."""
    patterns = tuple(pattern.strip() for pattern in str(hparams["jps_candidates"]).split(",")
                     if pattern.strip())
    return SelectionConfig(
        k=int(hparams["jps_k"]), rho=float(hparams["jps_rho"]),
        candidate_patterns=patterns, variance=str(hparams["jps_variance"]),
        selection_batches=int(hparams["jps_selection_batches"]))


def check_update_implementation(name: str) -> None:
    """Raise ValueError unless ``name`` is a masked-update implementation."""
    if name not in UPDATE_IMPLEMENTATIONS:
        raise ValueError(f"jps_update must be one of {UPDATE_IMPLEMENTATIONS}, got {name!r}")


class ClassifierHead(nn.Module):
    """Linear classifier on CLIP image embeddings.

    With ``normalize_features`` the embedding is L2-normalized first, as in
    CLIP's zero-shot classifier, whose weights are the class text embeddings
    times CLIP's logit scale.
    """

    def __init__(self, in_features: int, num_classes: int, normalize_features: bool):
        super().__init__()
        self.normalize_features = normalize_features
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize_features:
            features = F.normalize(features, dim=-1)
        return self.linear(features)


def build_head(clip_model: nn.Module, in_features: int, num_classes: int,
               hparams: Mapping[str, object]) -> ClassifierHead:
    """Build the head that ``hparams['head_init']`` requests ("random" or "zeroshot")."""
    head_init = hparams["head_init"]
    if head_init == "random":
        return ClassifierHead(in_features, num_classes, normalize_features=False)
    if head_init != "zeroshot":
        raise ValueError(f"head_init must be 'random' or 'zeroshot', got {head_init!r}")

    dataset = str(hparams.get("dataset", ""))
    names = class_names(dataset, num_classes)
    head = ClassifierHead(in_features, num_classes, normalize_features=True)
    text = zero_shot_head_weights(clip_model, names, model_name=str(hparams["clip_model"]))
    with torch.no_grad():
        head.linear.weight.copy_(clip_model.logit_scale.exp() * text)
        head.linear.bias.zero_()
    logger.info("zero-shot head for %s from %d class names", dataset, len(names))
    return head


class CLIPAlgorithm(Algorithm):
    """Shared parts: CLIP featurizer, head, AdamW optimizer and checkpoints."""

    # Whether the checkpoint must carry the whole encoder even when it has a
    # pretrained source (full fine-tuning changes every weight).
    saves_whole_encoder = False

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        missing = [name for name in REQUIRED_HPARAMS if name not in hparams]
        if missing:
            raise KeyError(
                f"hparams lack {missing}; start from "
                f"hparams_registry.default_hparams('{type(self).__name__}', dataset), "
                "which needs the patched DomainBed")
        self.num_domains = num_domains
        self.spec = clip_spec_from_hparams(hparams)
        try:
            self.featurizer, clip_model = build_clip_featurizer(input_shape, self.spec)
        except (ValueError, PretrainedWeightsNotFoundError) as error:
            raise type(error)(f"{error}. {CLIP_HPARAMS_HINT}") from error
        self.classifier = build_head(clip_model, self.featurizer.n_outputs, num_classes, hparams)
        del clip_model  # the text tower is only needed for the zero-shot head
        self.encoder_hash = weights_hash(self.featurizer)
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters(), lr=float(hparams["lr"]),
            weight_decay=float(hparams["weight_decay"]))

    def trainable_parameters(self) -> List[nn.Parameter]:
        return list(self.featurizer.parameters()) + list(self.classifier.parameters())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))

    def step(self, minibatches: Minibatches) -> Dict[str, float]:
        """Run one optimizer step of cross-entropy over all minibatches."""
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(all_x), all_y)

        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def update(self, minibatches: Minibatches, unlabeled=None) -> Dict[str, float]:
        return self.step(minibatches)

    # Checkpoints -----------------------------------------------------------

    def encoder_saved_whole(self) -> bool:
        return self.saves_whole_encoder or self.spec.is_random_init

    def state_dict(self, *args, **kwargs):
        """Return a checkpoint: head, encoder identity, and what changed.

        The encoder is stored whole only when it has no pretrained source
        (random initialization) or when all its weights are trained. Otherwise
        its model name, pretrained tag and weights hash identify it.
        """
        if args or kwargs.get("destination") is not None or kwargs.get("prefix"):
            # NOTE: as a submodule of another module, the plain layout is used.
            return super().state_dict(*args, **kwargs)
        state = {
            "format": CHECKPOINT_FORMAT,
            "algorithm": type(self).__name__,
            "clip": self.spec.to_dict(),
            "encoder_hash": self.encoder_hash,
            "head": self.classifier.state_dict(),
            "encoder": None,
        }
        if self.encoder_saved_whole():
            # References, as nn.Module.state_dict returns: DomainBed's train.py
            # takes a state dict at every checkpoint, and a copy of a full
            # ViT-B/16 costs 344 MB each time.
            state["encoder"] = self.featurizer.state_dict()
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint written by ``state_dict``.

        Raises ValueError when the checkpoint belongs to another algorithm or
        another encoder, or when the encoder built from the hyperparameters
        has weights whose hash differs from the saved one.
        """
        if state_dict.get("format") != CHECKPOINT_FORMAT:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        if state_dict["algorithm"] != type(self).__name__:
            raise ValueError(
                f"checkpoint of algorithm {state_dict['algorithm']!r} cannot be loaded "
                f"into {type(self).__name__}")
        saved_model = state_dict["clip"]["model_name"]
        if saved_model != self.spec.model_name:
            raise ValueError(
                f"checkpoint encoder {saved_model!r} differs from this algorithm's "
                f"{self.spec.model_name!r}; build it with the checkpoint's hparams")

        # Every check runs before the first weight is written.
        self.check_extra_state(state_dict)
        if state_dict["encoder"] is not None:
            self.featurizer.load_state_dict(state_dict["encoder"], strict=strict)
        elif state_dict["encoder_hash"] != self.encoder_hash:
            raise ValueError(
                f"the encoder weights here ({self.spec.model_name}, pretrained "
                f"{self.spec.pretrained!r}, SHA-256 {self.encoder_hash[:12]}...) differ from "
                f"those the checkpoint was trained on (SHA-256 {state_dict['encoder_hash'][:12]}..., "
                f"pretrained {state_dict['clip']['pretrained']!r}); load the same pretrained weights")
        self.classifier.load_state_dict(state_dict["head"], strict=strict)
        self.load_extra_state(state_dict)
        return nn.modules.module._IncompatibleKeys([], [])

    def check_extra_state(self, state_dict) -> None:
        """Raise ValueError if what a subclass adds to the checkpoint cannot be loaded."""

    def load_extra_state(self, state_dict) -> None:
        """Load what a subclass adds to the checkpoint."""


class CLIP_ERM(CLIPAlgorithm):
    """ERM with full fine-tuning of the CLIP image encoder and the head."""

    saves_whole_encoder = True


class CLIP_LinearProbe(CLIPAlgorithm):
    """Linear probe: only the head trains; the CLIP encoder stays frozen."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer.requires_grad_(False)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return list(self.classifier.parameters())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.featurizer(x)
        return self.classifier(features)


class JPS(CLIPAlgorithm):
    """Joint Parameter Selection on a CLIP image encoder.

    The mask is selected from source-domain minibatches before any weight
    moves. Pass ``source_minibatches`` (a list of ``jps_selection_batches``
    steps, each a list with one ``(x, y)`` per source domain, exactly what
    ``update`` receives) to select in ``__init__``. Without it, as in
    DomainBed's ``train.py``, the first ``jps_selection_batches`` calls of
    ``update`` supply the batches: the earlier calls only record them and
    report the loss, and the last one selects the mask and then takes the
    first optimizer step. Both paths give the same mask from the same batches.
    """

    def __init__(self, input_shape, num_classes, num_domains, hparams,
                 source_minibatches: Optional[Sequence[Minibatches]] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.update_implementation = str(hparams.get("jps_update", "sparse"))
        try:
            self.selection_config = selection_config_from_hparams(hparams)
            candidates = find_candidates(self.featurizer, self.selection_config.candidate_patterns)
            self.selection_config.validate(sum(param.numel() for param in candidates.values()))
            check_update_implementation(self.update_implementation)
        except ValueError as error:
            raise ValueError(f"invalid JPS setting: {error}. {JPS_HPARAMS_HINT}") from error
        self.masked = None
        self._pending: List[List[Tuple[torch.Tensor, torch.Tensor]]] = []
        self._warned_pending = -1
        if source_minibatches is not None:
            self.build_mask(source_minibatches)

    @property
    def mask(self) -> Optional[SparseMask]:
        return self.masked.mask if self.masked is not None else None

    def build_mask(self, steps: Sequence[Minibatches]) -> SparseMask:
        """Select the mask from ``steps`` and restrict training to it."""
        if self.masked is not None:
            raise RuntimeError("the JPS mask is already built; it is selected once")
        needed = self.selection_config.selection_batches
        if len(steps) < needed:
            raise ValueError(
                f"JPS selection needs {needed} minibatches per source domain "
                f"(jps_selection_batches), got {len(steps)}")
        for position, minibatches in enumerate(steps):
            if len(minibatches) != self.num_domains:
                raise ValueError(
                    f"selection step {position} has {len(minibatches)} minibatches, one per "
                    f"source domain was expected ({self.num_domains})")
        domains = [[steps[step][domain] for step in range(needed)]
                   for domain in range(self.num_domains)]
        names = [f"{domain} (index among the training environments)" for domain in range(self.num_domains)]
        mask = select_mask(self.featurizer, self.classifier, domains, self.selection_config,
                           domain_names=names)
        self._restrict_to_mask(mask)
        return mask

    def _restrict_to_mask(self, mask: SparseMask) -> None:
        self.masked = apply_mask(self.featurizer, mask, self.optimizer,
                                 implementation=self.update_implementation,
                                 base_hash=self.encoder_hash)

    def update(self, minibatches: Minibatches, unlabeled=None) -> Dict[str, float]:
        if self.masked is None:
            self._pending.append([(x.detach(), y.detach()) for x, y in minibatches])
            if len(self._pending) < self.selection_config.selection_batches:
                with torch.no_grad():
                    loss = F.cross_entropy(self.predict(torch.cat([x for x, _ in minibatches])),
                                           torch.cat([y for _, y in minibatches]))
                return {"loss": loss.item()}
            pending, self._pending = self._pending, []
            self.build_mask(pending)
        return self.step(minibatches)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.masked is None and len(self._pending) != self._warned_pending:
            # DomainBed saves a checkpoint at step 0 too, so this is normal early on
            # but means a wasted job when it is the last checkpoint.
            self._warned_pending = len(self._pending)
            logger.warning(
                "JPS checkpoint without a mask: selection needs %d update calls "
                "(jps_selection_batches) and %d happened, so no weight has trained yet; "
                "a job that ends here needs more --steps",
                self.selection_config.selection_batches, len(self._pending))
        if state.get("format") == CHECKPOINT_FORMAT:
            state["mask"] = self.mask.state_dict() if self.mask is not None else None
            state["selected_values"] = (
                {name: value.cpu() for name, value in self.masked.selected_values().items()}
                if self.masked is not None else None)
        return state

    def check_extra_state(self, state_dict) -> None:
        if state_dict.get("mask") is None:
            return
        mask = SparseMask.from_state_dict(state_dict["mask"])
        if self.masked is not None and not self.masked.mask.equals(mask):
            raise ValueError("this JPS already has a different mask; load the checkpoint "
                             "into a new JPS")
        if state_dict["encoder"] is None:
            check_values(mask, state_dict["selected_values"])

    def load_extra_state(self, state_dict) -> None:
        if state_dict.get("mask") is None:
            return
        if self.masked is None:
            self._restrict_to_mask(SparseMask.from_state_dict(state_dict["mask"]))
        if state_dict["encoder"] is None:
            self.masked.load_selected_values(state_dict["selected_values"])
