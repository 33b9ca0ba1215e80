"""The sparse masked update against the dense reference."""

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny, make_domains
from jps_domainbed.mask import SparseMask
from jps_domainbed.masked_training import apply_mask, bitwise_unchanged
from jps_domainbed.selection import SelectionConfig, select_mask

CONFIG = SelectionConfig(k=40, rho=0.3, selection_batches=2)


def train(implementation, steps=8, optimizer_factory=None, mask=None):
    featurizer, head, _ = build_tiny(seed=0)
    domains = make_domains()
    if mask is None:
        mask = select_mask(featurizer, head, domains, CONFIG, show_progress=False)
    factory = optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5))
    optimizer = factory(list(featurizer.parameters()) + list(head.parameters()))
    masked = apply_mask(featurizer, mask, optimizer, implementation=implementation)
    for step in range(steps):
        x, y = domains[step % len(domains)][step % 2]
        loss = F.cross_entropy(head(featurizer(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return featurizer, head, masked, optimizer, mask


@pytest.mark.parametrize("factory", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["adamw_weight_decay", "sgd_momentum_weight_decay"])
def test_sparse_matches_dense(factory):
    dense_featurizer, dense_head, dense, _, mask = train("dense", optimizer_factory=factory)
    sparse_featurizer, sparse_head, sparse, _, _ = train("sparse", optimizer_factory=factory, mask=mask)

    for name, values in dense.selected_values().items():
        torch.testing.assert_close(sparse.selected_values()[name], values, rtol=1e-5, atol=1e-6)
    dense_params = dict(dense_featurizer.named_parameters())
    for name, param in sparse_featurizer.named_parameters():
        torch.testing.assert_close(param, dense_params[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_head.weight, dense_head.weight, rtol=1e-5, atol=1e-6)


def test_sparse_matches_dense_with_many_entries_per_layer():
    # More selected entries in a layer than its 64 input features takes the
    # other branch of the backward, which keeps the whole layer input.
    featurizer, head, _ = build_tiny(seed=0)
    config = SelectionConfig(k=300, rho=0.3, selection_batches=2)
    mask = select_mask(featurizer, head, make_domains(), config, show_progress=False)
    assert max(mask.counts().values()) > 64
    _, _, dense, _, _ = train("dense", mask=mask)
    _, _, sparse, _, _ = train("sparse", mask=mask)
    for name, values in dense.selected_values().items():
        torch.testing.assert_close(sparse.selected_values()[name], values, rtol=1e-5, atol=1e-6)


def test_sparse_keeps_other_entries_bit_identical():
    featurizer, _, _ = build_tiny(seed=0)
    before = {name: param.detach().clone() for name, param in featurizer.named_parameters()}
    trained, _, masked, _, mask = train("sparse", steps=20)
    assert sum(bitwise_unchanged(before, trained.named_parameters(), mask).values()) == 0
    for name, values in masked.selected_values().items():
        assert bool((values != before[name].flatten()[mask.indices[name]]).all()), name


def test_sparse_forms_no_dense_weight_gradient():
    featurizer, head, masked, optimizer, mask = train("sparse", steps=1)
    for name, param in featurizer.named_parameters():
        assert param.grad is None, name
        assert not param.requires_grad, name
    assert all(values.grad is not None for values in masked.parameters())
    assert [values.numel() for values in masked.parameters()] == list(mask.counts().values())


def test_optimizer_state_scales_with_k():
    _, head, masked, optimizer, mask = train("sparse", steps=2)
    state_numel = sum(tensor.numel() for state in optimizer.state.values()
                      for tensor in state.values() if torch.is_tensor(tensor) and tensor.dim() > 0)
    head_numel = sum(param.numel() for param in head.parameters())
    assert state_numel == 2 * (mask.num_selected + head_numel)


def test_blocks_below_lowest_mask_run_without_autograd():
    featurizer, head, _ = build_tiny(seed=0)
    name = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    shapes = {name: (256, 64)}
    mask = SparseMask(indices={name: torch.tensor([3, 500, 9000])}, shapes=shapes)
    masked = apply_mask(featurizer, mask, implementation="sparse")
    assert masked.lowest_block == 1

    outputs = {}
    for index in (0, 1):
        block = featurizer.visual.transformer.resblocks[index]
        block.register_forward_hook(lambda module, args, output, index=index:
                                    outputs.__setitem__(index, output))
    head(featurizer(torch.randn(2, 3, 32, 32))).sum().backward()
    assert not outputs[0].requires_grad
    assert outputs[1].requires_grad
    assert masked.parameters()[0].grad.shape == (3,)


def test_sparse_rejects_non_linear_parameter():
    featurizer, _, _ = build_tiny(seed=0)
    name = "visual.positional_embedding"
    mask = SparseMask(indices={name: torch.tensor([0])}, shapes={name: tuple(featurizer.visual.positional_embedding.shape)})
    with pytest.raises(ValueError, match="nn.Linear weights only.*'visual.positional_embedding'"):
        apply_mask(featurizer, mask, implementation="sparse")


def test_detach_restores_module_forward():
    featurizer, head, masked, _, _ = train("sparse", steps=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = featurizer(x)
    masked.detach()
    for module in featurizer.modules():
        assert "forward" not in module.__dict__
    with torch.no_grad():
        torch.testing.assert_close(featurizer(x), before)
