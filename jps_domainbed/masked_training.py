"""Exact masked fine-tuning: only the selected entries of a backbone change.

``apply_mask(backbone, mask, optimizer)`` freezes every backbone parameter
except the selected entries and rewrites the optimizer's parameter groups to
match, so a plain ``loss.backward(); optimizer.step()`` loop trains only the
mask (plus whatever else the optimizer holds, such as a classifier head).

Two implementations share that interface. "dense" (this module) keeps each
masked weight as a dense parameter, zeroes the gradient outside the mask and,
after every optimizer step, copies the pretrained values back outside the
mask. Zeroing the gradient alone is not enough: AdamW's decoupled weight
decay, or Adam/SGD weight decay combined with momentum, moves entries whose
gradient is zero. The copy-back makes every non-selected entry bit-identical
to its pretrained value after any number of steps, whatever the optimizer.
The "sparse" implementation in ``sparse_update`` computes gradients for the
selected entries only.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn

from .mask import SparseMask

logger = logging.getLogger(__name__)


class MaskedUpdate:
    """Handle on a backbone whose training is restricted to a mask.

    Subclasses implement ``parameters``, ``selected_values`` and
    ``load_selected_values``, and may add optimizer hooks in ``attach``.
    """

    implementation = "abstract"

    def __init__(self, backbone: nn.Module, mask: SparseMask, base_hash: Optional[str] = None):
        mask.check_compatible(backbone.named_parameters())
        self.backbone = backbone
        self.mask = mask
        # Hashing a ViT-B/16 reads 344 MB, so a caller that already has the
        # hash of the pretrained weights passes it in.
        self.base_hash = base_hash if base_hash is not None else weights_hash(backbone)
        self._hook_handles: List[object] = []

    def parameters(self) -> List[torch.Tensor]:
        """The backbone tensors an optimizer must update."""
        raise NotImplementedError

    def replaced_parameters(self) -> Dict[int, List[torch.Tensor]]:
        """Map id(original backbone parameter) to the tensors that replace it
        in optimizer parameter groups."""
        raise NotImplementedError

    def selected_values(self) -> Dict[str, torch.Tensor]:
        """Current values of the selected entries, per parameter name (1-D)."""
        raise NotImplementedError

    def load_selected_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Write saved values of the selected entries into the backbone."""
        raise NotImplementedError

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` train exactly the mask; see ``apply_mask``."""
        backbone_ids = {id(param) for param in self.backbone.parameters()}
        for param in optimizer.state:
            if id(param) in backbone_ids:
                raise ValueError(
                    "the optimizer already has state for backbone parameters; "
                    "apply the mask before the first optimizer step")

        replacements = self.replaced_parameters()
        placed = set()
        for group in optimizer.param_groups:
            params = []
            for param in group["params"]:
                if id(param) in replacements:
                    params.extend(replacements[id(param)])
                    placed.add(id(param))
                elif id(param) not in backbone_ids:
                    params.append(param)
            group["params"] = params
        missing = [tensor for key, tensors in replacements.items() if key not in placed
                   for tensor in tensors]
        if missing:
            optimizer.add_param_group({"params": missing})

    def detach(self) -> None:
        """Remove the hooks this handle installed."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


class DenseMaskedUpdate(MaskedUpdate):
    """Dense parameters with masked gradients and a copy-back after each step."""

    implementation = "dense"

    def __init__(self, backbone: nn.Module, mask: SparseMask, base_hash: Optional[str] = None):
        super().__init__(backbone, mask, base_hash)
        named = dict(backbone.named_parameters())
        self._masked: Dict[str, nn.Parameter] = {
            name: named[name] for name in mask.selected_names()}
        self._dense_masks = {
            name: mask.dense(name, device=param.device) for name, param in self._masked.items()}
        # Pretrained values, read back after every step outside the mask.
        self._frozen = {name: param.detach().clone() for name, param in self._masked.items()}

        for param in backbone.parameters():
            param.requires_grad_(False)
        for name, param in self._masked.items():
            param.requires_grad_(True)
            self._hook_handles.append(param.register_hook(
                lambda grad, name=name: torch.where(self._on_device(name, grad.device)[0], grad,
                                                    torch.zeros_like(grad))))

    def parameters(self) -> List[torch.Tensor]:
        return list(self._masked.values())

    def replaced_parameters(self) -> Dict[int, List[torch.Tensor]]:
        return {id(param): [param] for param in self._masked.values()}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self._hook_handles.append(
            optimizer.register_step_post_hook(lambda *_: self.restore_frozen()))

    def _on_device(self, name: str, device: torch.device):
        """Return (mask, pretrained copy) of ``name`` on ``device``.

        The backbone may move, as DomainBed's ``algorithm.to(device)`` does
        after construction, so the copies follow it on first use.
        """
        if self._frozen[name].device != device:
            self._frozen[name] = self._frozen[name].to(device)
            self._dense_masks[name] = self._dense_masks[name].to(device)
        return self._dense_masks[name], self._frozen[name]

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Copy the pretrained values back into every non-selected entry."""
        for name, param in self._masked.items():
            keep, frozen = self._on_device(name, param.device)
            param.copy_(torch.where(keep, param, frozen))

    def selected_values(self) -> Dict[str, torch.Tensor]:
        return {name: param.detach().flatten()[self.mask.indices[name].to(param.device)].clone()
                for name, param in self._masked.items()}

    @torch.no_grad()
    def load_selected_values(self, values: Mapping[str, torch.Tensor]) -> None:
        check_values(self.mask, values)
        for name, param in self._masked.items():
            param.view(-1)[self.mask.indices[name].to(param.device)] = values[name].to(param)


IMPLEMENTATIONS = {"dense": DenseMaskedUpdate}


def apply_mask(backbone: nn.Module, mask: SparseMask,
               optimizer: Optional[torch.optim.Optimizer] = None,
               implementation: str = "dense", base_hash: Optional[str] = None) -> MaskedUpdate:
    """Restrict training of ``backbone`` to the entries selected by ``mask``.

    Every backbone parameter stops requiring a gradient, except the tensors
    that carry selected entries. When ``optimizer`` is given, its parameter
    groups are rewritten. Backbone parameters are removed or replaced by the
    tensors of ``MaskedUpdate.parameters()``, which form a new group if the
    optimizer had none of them. Any other parameter, such as a classifier
    head, is kept. Call it before the optimizer's first step.
    ``base_hash`` is the ``weights_hash`` of the pretrained backbone when the
    caller has it already; otherwise it is computed here.

    Raises ValueError when the mask does not fit the backbone, the optimizer
    already has state for backbone parameters, or ``implementation`` is
    unknown.
    """
    if implementation not in IMPLEMENTATIONS:
        _load_optional_implementations()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown masked-update implementation {implementation!r}; "
            f"choose one of {sorted(IMPLEMENTATIONS)}")
    masked = IMPLEMENTATIONS[implementation](backbone, mask, base_hash)
    if optimizer is not None:
        masked.attach(optimizer)
    logger.info("masked update (%s): %d selected weights in %d tensors",
                implementation, mask.num_selected, len(mask.selected_names()))
    return masked


def _load_optional_implementations() -> None:
    try:
        from . import sparse_update  # noqa: F401  (registers "sparse")
    except ImportError:
        pass


def check_values(mask: SparseMask, values: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError unless ``values`` has one entry per selected weight."""
    for name in mask.selected_names():
        if name not in values:
            raise ValueError(f"saved values have no entry for masked parameter {name!r}")
        expected = mask.indices[name].numel()
        if values[name].numel() != expected:
            raise ValueError(
                f"saved values for {name!r} have {values[name].numel()} entries, "
                f"the mask selects {expected}")


def weights_hash(module: nn.Module, overrides: Optional[Mapping[str, torch.Tensor]] = None) -> str:
    """Return the SHA-256 hex digest of a module's state dict.

    Names, dtypes, shapes and raw bytes of every tensor enter the hash, in
    sorted name order; ``overrides`` replaces named tensors before hashing.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    if overrides:
        state.update(overrides)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


MASKED_WEIGHTS_FORMAT = "jps-masked-weights/1"


def save_masked_weights(path, masked: MaskedUpdate, identity: Optional[Mapping[str, object]] = None) -> None:
    """Save the mask, the selected entries' values and the base-weights hash.

    The file takes kilobytes for a few thousand weights, because the frozen weights
    are identified by ``masked.base_hash`` (and ``identity``, such as the
    model name and pretrained tag), not stored.
    """
    torch.save(masked_weights_state(masked, identity), path)


def masked_weights_state(masked: MaskedUpdate, identity: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """Return the dict that ``save_masked_weights`` writes."""
    return {
        "format": MASKED_WEIGHTS_FORMAT,
        "mask": masked.mask.state_dict(),
        "values": {name: value.cpu() for name, value in masked.selected_values().items()},
        "base_hash": masked.base_hash,
        "identity": dict(identity or {}),
    }


def load_masked_weights(path_or_state, backbone: nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None,
                        implementation: str = "dense", check_hash: bool = True) -> MaskedUpdate:
    """Apply a saved mask to ``backbone`` and write the saved trained values.

    ``backbone`` must hold the same pretrained weights the mask was trained
    from: its hash is compared with the saved one and a mismatch raises
    ValueError, unless ``check_hash`` is False.
    """
    if isinstance(path_or_state, Mapping):
        state = path_or_state
    else:
        state = torch.load(path_or_state, map_location="cpu", weights_only=True)
    if state.get("format") != MASKED_WEIGHTS_FORMAT:
        raise ValueError(
            f"{path_or_state if not isinstance(path_or_state, Mapping) else 'state'} is not "
            f"a JPS masked-weights file (format {state.get('format')!r}, expected "
            f"{MASKED_WEIGHTS_FORMAT!r})")
    mask = SparseMask.from_state_dict(state["mask"])
    mask.check_compatible(backbone.named_parameters())
    # Checked before apply_mask, so a rejected file leaves the backbone and
    # the optimizer as they were.
    base_hash = weights_hash(backbone)
    if check_hash and base_hash != state["base_hash"]:
        raise ValueError(
            f"the backbone's weights (SHA-256 {base_hash[:12]}...) differ from "
            f"those the mask was trained on ({state['base_hash'][:12]}..., "
            f"identity {state.get('identity')}); load the same pretrained weights")
    check_values(mask, state["values"])
    masked = apply_mask(backbone, mask, optimizer, implementation, base_hash=base_hash)
    masked.load_selected_values(state["values"])
    return masked


def bitwise_unchanged(before: Mapping[str, torch.Tensor], after: Iterable, mask: SparseMask) -> Dict[str, int]:
    """Count, per parameter, the non-selected entries that differ bitwise.

    ``before`` maps names to tensors saved before training; ``after`` is an
    iterable of (name, tensor) such as ``module.named_parameters()``.
    """
    changed = {}
    for name, tensor in after:
        if name not in before:
            continue
        old = before[name].detach().cpu().contiguous()
        new = tensor.detach().cpu().contiguous()
        differs = old.view(torch.uint8).view(-1, old.element_size()) != \
            new.view(torch.uint8).view(-1, new.element_size())
        differs = differs.any(dim=1)
        if name in mask.indices:
            differs[mask.indices[name]] = False
        changed[name] = int(differs.sum())
    return changed
