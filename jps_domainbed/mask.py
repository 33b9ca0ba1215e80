"""Sparse masks over named parameters, and the per-layer summary of a mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Tuple

import torch

MASK_FORMAT_VERSION = 1


@dataclass
class SparseMask:
    """Selected entries of named parameters.

    ``indices[name]`` contains the sorted flat (row-major) int64 indices of the
    selected entries of the parameter called ``name``; ``shapes[name]`` is that
    parameter's shape. A candidate parameter with no selected entry is kept
    with an empty index tensor, so per-layer reports list every candidate.
    """

    indices: Dict[str, torch.Tensor]
    shapes: Dict[str, Tuple[int, ...]]
    metadata: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if set(self.indices) != set(self.shapes):
            raise ValueError(
                "SparseMask needs one shape per parameter name; names with "
                f"indices but no shape or the reverse: "
                f"{sorted(set(self.indices) ^ set(self.shapes))}")
        for name, index in self.indices.items():
            index = torch.as_tensor(index, dtype=torch.int64).flatten().cpu()
            size = _numel(self.shapes[name])
            if index.numel() and (index.min() < 0 or index.max() >= size):
                raise ValueError(
                    f"mask indices for {name!r} fall outside its {size} "
                    f"entries (shape {tuple(self.shapes[name])})")
            if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                index = torch.unique(index)
            self.indices[name] = index
            self.shapes[name] = tuple(int(s) for s in self.shapes[name])

    @property
    def names(self) -> List[str]:
        """Candidate parameter names, in the order they were given."""
        return list(self.indices)

    @property
    def num_selected(self) -> int:
        return sum(int(index.numel()) for index in self.indices.values())

    @property
    def num_candidates(self) -> int:
        return sum(_numel(shape) for shape in self.shapes.values())

    def counts(self) -> Dict[str, int]:
        """Number of selected entries per parameter name."""
        return {name: int(index.numel()) for name, index in self.indices.items()}

    def selected_names(self) -> List[str]:
        """Names of the parameters that hold at least one selected entry."""
        return [name for name, index in self.indices.items() if index.numel()]

    def dense(self, name: str, device=None) -> torch.Tensor:
        """Return the boolean mask of parameter ``name`` in its own shape."""
        flat = torch.zeros(_numel(self.shapes[name]), dtype=torch.bool, device=device)
        flat[self.indices[name].to(device)] = True
        return flat.view(self.shapes[name])

    def rows_and_columns(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the (row, column) of each selected entry of a 2-D parameter."""
        shape = self.shapes[name]
        if len(shape) != 2:
            raise ValueError(f"{name!r} has shape {shape}; rows and columns need a 2-D weight")
        index = self.indices[name]
        return index // shape[1], index % shape[1]

    def state_dict(self) -> Dict[str, object]:
        return {
            "format_version": MASK_FORMAT_VERSION,
            "indices": {name: index.clone() for name, index in self.indices.items()},
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object]) -> "SparseMask":
        version = state.get("format_version")
        if version != MASK_FORMAT_VERSION:
            raise ValueError(
                f"unsupported mask format version {version!r}; this version of "
                f"jps_domainbed reads version {MASK_FORMAT_VERSION}")
        return cls(
            indices={name: torch.as_tensor(index) for name, index in state["indices"].items()},
            shapes={name: tuple(shape) for name, shape in state["shapes"].items()},
            metadata=dict(state.get("metadata", {})),
        )

    def equals(self, other: "SparseMask") -> bool:
        """True when both masks select the same entries of the same parameters."""
        if self.shapes != other.shapes or list(self.indices) != list(other.indices):
            return False
        return all(torch.equal(self.indices[name], other.indices[name]) for name in self.indices)

    def check_compatible(self, named_parameters: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Raise ValueError unless every masked name exists with the same shape."""
        shapes = {name: tuple(param.shape) for name, param in named_parameters}
        missing = [name for name in self.indices if name not in shapes]
        if missing:
            raise ValueError(
                f"the model has no parameter named {missing[0]!r} "
                f"({len(missing)} masked names missing); the mask was built for "
                "another model or for a module at another nesting level")
        for name, shape in self.shapes.items():
            if shapes[name] != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {shapes[name]} but the mask "
                    f"was built for shape {shape}")


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count
