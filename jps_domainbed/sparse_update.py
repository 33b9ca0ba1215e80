"""Sparse masked update: gradients for the selected entries only.

``apply_mask(backbone, mask, optimizer, implementation="sparse")`` trains the
same entries as the dense implementation and gives the same weights up to
float32 summation order, at a lower cost:

- Each masked ``nn.Linear`` keeps its dense weight frozen (no gradient) and
  gets a trainable vector ``values`` with one entry per selected weight. Its
  forward is ``F.linear(x, W, b)`` where ``W`` already contains ``values`` at
  the selected positions; the backward computes

      dL/dx       = dL/dy @ W                     (only when x needs it)
      dL/dvalues  = Σ_n dL/dy[n, r_i] * x[n, c_i] for each selected (r_i, c_i)

  where n runs over every leading position (batch and token). No dense
  (out x in) weight gradient is formed.
- Transformer blocks below the lowest block that holds a selected weight run
  under ``torch.no_grad()``, so backpropagation stops there.
- The optimizer updates ``values`` instead of the dense weights, so its state
  grows with k, not with the encoder.

After every optimizer step (a step post-hook) the new ``values`` are written
into ``W``. No other entry of ``W`` is written, so non-selected entries stay
bit-identical to their pretrained values.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mask import SparseMask
from .masked_training import IMPLEMENTATIONS, MaskedUpdate, check_values

BLOCK_PATTERN = re.compile(r"^(?P<prefix>.*\bresblocks)\.(?P<index>\d+)$")


class _SparseLinearFunction(torch.autograd.Function):
    """y = x W^T + b with the gradient taken for the selected entries of W only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, columns):
        # Keep only the input columns the selected entries read, unless a
        # layer has more selected entries than input features.
        flat_x = x.reshape(-1, x.shape[-1])
        if columns.numel() < x.shape[-1]:
            ctx.save_for_backward(flat_x[:, columns], weight, rows)
        else:
            ctx.save_for_backward(flat_x, weight, rows, columns)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        if len(saved) == 3:
            selected_x, weight, rows = saved
        else:
            flat_x, weight, rows, columns = saved
            selected_x = flat_x[:, columns]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output.matmul(weight)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_values = (flat_grad[:, rows] * selected_x).sum(dim=0)
        return grad_x, None, None, grad_values, None, None


class SparseMaskedUpdate(MaskedUpdate):
    """Trainable vectors of selected entries in place of dense weight gradients."""

    implementation = "sparse"

    def __init__(self, backbone: nn.Module, mask: SparseMask, base_hash: Optional[str] = None):
        super().__init__(backbone, mask, base_hash)
        modules = dict(backbone.named_modules())
        named = dict(backbone.named_parameters())
        self._weights: Dict[str, nn.Parameter] = {}
        self._values: Dict[str, nn.Parameter] = {}
        self._rows: Dict[str, torch.Tensor] = {}
        self._columns: Dict[str, torch.Tensor] = {}
        self._index: Dict[str, torch.Tensor] = {}
        self._original_forwards: Dict[str, object] = {}

        for param in backbone.parameters():
            param.requires_grad_(False)

        for name in mask.selected_names():
            module_name, _, attribute = name.rpartition(".")
            module = modules.get(module_name)
            if not isinstance(module, nn.Linear) or attribute != "weight":
                raise ValueError(
                    f"the sparse update supports nn.Linear weights only, but {name!r} is "
                    f"not one; use implementation='dense'")
            weight = named[name]
            rows, columns = mask.rows_and_columns(name)
            index = mask.indices[name].to(weight.device)
            self._weights[name] = weight
            self._rows[name] = rows.to(weight.device)
            self._columns[name] = columns.to(weight.device)
            self._index[name] = index
            self._values[name] = nn.Parameter(weight.detach().view(-1)[index].clone())
            self._original_forwards[module_name] = module.__dict__.get("forward")
            module.forward = self._make_forward(module, name)

        self.lowest_block = self._freeze_blocks_below()

    def _make_forward(self, module: nn.Linear, name: str):
        def forward(x):
            values = self._values[name]
            weight = self._weights[name]
            if values.device != weight.device:
                # The backbone moved (DomainBed calls algorithm.to(device)):
                # follow it in place so optimizer references stay valid.
                values.data = values.data.to(weight.device)
                self._rows[name] = self._rows[name].to(weight.device)
                self._columns[name] = self._columns[name].to(weight.device)
                self._index[name] = self._index[name].to(weight.device)
            return _SparseLinearFunction.apply(x, weight, module.bias, values,
                                               self._rows[name], self._columns[name])
        return forward

    def _freeze_blocks_below(self) -> Optional[int]:
        """Run transformer blocks below the lowest masked one under no_grad."""
        blocks = {}
        for module_name, module in self.backbone.named_modules():
            match = BLOCK_PATTERN.match(module_name)
            if match:
                blocks[module_name] = (int(match.group("index")), module)
        masked_indices = [index for block_name, (index, _) in blocks.items()
                          if any(name.startswith(block_name + ".") for name in self._weights)]
        if not masked_indices:
            return None
        lowest = min(masked_indices)
        for block_name, (index, module) in blocks.items():
            if index < lowest:
                self._original_forwards[block_name] = module.__dict__.get("forward")
                module.forward = _no_grad_forward(module)
        return lowest

    def parameters(self) -> List[torch.Tensor]:
        return list(self._values.values())

    def replaced_parameters(self) -> Dict[int, List[torch.Tensor]]:
        return {id(self._weights[name]): [values] for name, values in self._values.items()}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self._hook_handles.append(
            optimizer.register_step_post_hook(lambda *_: self.write_values()))

    @torch.no_grad()
    def write_values(self) -> None:
        """Copy the trained values into the dense weights at the selected entries."""
        # Runs after every optimizer step, so the indices stay on the weights' device.
        for name, values in self._values.items():
            self._weights[name].view(-1)[self._index[name]] = values

    def selected_values(self) -> Dict[str, torch.Tensor]:
        return {name: values.detach().clone() for name, values in self._values.items()}

    @torch.no_grad()
    def load_selected_values(self, values: Mapping[str, torch.Tensor]) -> None:
        check_values(self.mask, values)
        for name, param in self._values.items():
            param.copy_(values[name].to(param))
        self.write_values()

    def detach(self) -> None:
        """Remove the hooks and give the modules back their own forward."""
        super().detach()
        modules = dict(self.backbone.named_modules())
        for module_name, original in self._original_forwards.items():
            if original is None:
                modules[module_name].__dict__.pop("forward", None)
            else:
                modules[module_name].forward = original
        self._original_forwards.clear()


def _no_grad_forward(module: nn.Module):
    forward = type(module).forward

    def run(*args, **kwargs):
        with torch.no_grad():
            return forward(module, *args, **kwargs)
    return run


IMPLEMENTATIONS["sparse"] = SparseMaskedUpdate
