"""Selection and exact masked training on a tiny open_clip ViT."""

import fnmatch

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny, make_domains
from jps_domainbed.masked_training import (apply_mask, bitwise_unchanged,
                                           load_masked_weights,
                                           save_masked_weights, weights_hash)
from jps_domainbed.selection import (NonFiniteGradientError, SelectionConfig,
                                     select_mask)

CONFIG = SelectionConfig(k=40, rho=0.3, selection_batches=2)


def select(featurizer, head, domains=None, config=CONFIG):
    return select_mask(featurizer, head, domains or make_domains(), config, show_progress=False)


def test_mask_size_and_placement(tiny):
    featurizer, head, _ = tiny
    mask = select(featurizer, head)

    assert mask.num_selected == 40
    assert mask.names == [f"visual.transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(2)]
    for name, index in mask.indices.items():
        assert mask.shapes[name] == (256, 64)
        assert int(index.max()) < 256 * 64
        assert torch.equal(index, torch.sort(index).values)
    assert sum(mask.counts().values()) == 40
    assert mask.num_candidates == 2 * 256 * 64


def test_selection_changes_no_weight(tiny):
    featurizer, head, _ = tiny
    before = weights_hash(featurizer)
    select(featurizer, head)
    assert weights_hash(featurizer) == before
    assert all(param.grad is None for param in featurizer.parameters())


def test_selection_is_deterministic():
    first = select(*build_tiny(seed=0)[:2])
    second = select(*build_tiny(seed=0)[:2])
    assert first.equals(second)
    other = select(*build_tiny(seed=3)[:2])
    assert not first.equals(other)


def test_custom_candidate_patterns(tiny):
    featurizer, head, _ = tiny
    config = SelectionConfig(k=10, rho=0.5, selection_batches=1,
                             candidate_patterns=("*.mlp.c_proj.weight",))
    mask = select(featurizer, head, config=config)
    assert all(fnmatch.fnmatch(name, "*.mlp.c_proj.weight") for name in mask.names)
    assert mask.num_selected == 10


def test_pattern_matching_nothing_rejected(tiny):
    featurizer, head, _ = tiny
    config = SelectionConfig(k=10, candidate_patterns=("*.mlp.fc1.weight",))
    with pytest.raises(ValueError, match=r"'\*\.mlp\.fc1\.weight' matches no parameter"):
        select(featurizer, head, config=config)


def test_k_larger_than_candidates_rejected(tiny):
    featurizer, head, _ = tiny
    with pytest.raises(ValueError, match="k=40000 is larger than the 32768 candidate"):
        select(featurizer, head, config=SelectionConfig(k=40000))


def test_empty_minibatch_rejected(tiny):
    featurizer, head, _ = tiny
    domains = make_domains()
    domains[1][0] = (domains[1][0][0][:0], domains[1][0][1][:0])
    with pytest.raises(ValueError, match="minibatch 0 of source domain cartoon is empty"):
        select_mask(featurizer, head, domains, CONFIG, domain_names=["art", "cartoon", "photo"],
                    show_progress=False)


def test_too_few_minibatches_rejected(tiny):
    featurizer, head, _ = tiny
    with pytest.raises(ValueError, match="source domain 0 gave 2 minibatches"):
        select(featurizer, head, config=SelectionConfig(k=10, selection_batches=3))


def test_nan_gradient_names_domain(tiny):
    featurizer, head, _ = tiny
    domains = make_domains()
    domains[2][1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="source domain sketch, minibatch 1,"):
        select_mask(featurizer, head, domains, CONFIG, domain_names=["art", "photo", "sketch"],
                    show_progress=False)


def test_single_domain_selects_k(tiny):
    featurizer, head, _ = tiny
    mask = select(featurizer, head, domains=make_domains(num_domains=1))
    assert mask.num_selected == 40


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adam_weight_decay": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1),
    "adamw_weight_decay": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5),
    "sgd_momentum_weight_decay": lambda params: torch.optim.SGD(
        params, lr=1e-1, momentum=0.9, weight_decay=0.1),
}


def train_steps(featurizer, head, optimizer, domains, steps):
    for step in range(steps):
        x, y = domains[step % len(domains)][0]
        loss = F.cross_entropy(head(featurizer(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_only_selected_entries_move(optimizer_name):
    featurizer, head, _ = build_tiny()
    domains = make_domains()
    mask = select(featurizer, head, domains)
    before = {name: param.detach().clone() for name, param in featurizer.named_parameters()}
    head_before = head.weight.detach().clone()
    optimizer = OPTIMIZERS[optimizer_name](list(featurizer.parameters()) + list(head.parameters()))

    masked = apply_mask(featurizer, mask, optimizer)
    train_steps(featurizer, head, optimizer, domains, steps=20)

    changed_outside = bitwise_unchanged(before, featurizer.named_parameters(), mask)
    assert set(changed_outside) == set(before)
    assert sum(changed_outside.values()) == 0, changed_outside
    for name, values in masked.selected_values().items():
        moved = values != before[name].flatten()[mask.indices[name]]
        assert bool(moved.all()), f"{int((~moved).sum())} selected entries of {name} did not move"
    assert not torch.equal(head.weight, head_before)


def test_optimizer_without_backbone_gets_mask_group(tiny):
    featurizer, head, _ = tiny
    mask = select(featurizer, head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.1)
    masked = apply_mask(featurizer, mask, optimizer)
    assert len(optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["params"] == masked.parameters()


def test_apply_after_first_step_rejected(tiny):
    featurizer, head, _ = tiny
    domains = make_domains()
    mask = select(featurizer, head, domains)
    optimizer = torch.optim.Adam(list(featurizer.parameters()) + list(head.parameters()))
    train_steps(featurizer, head, optimizer, domains, steps=1)
    with pytest.raises(ValueError, match="before the first optimizer step"):
        apply_mask(featurizer, mask, optimizer)


def test_unknown_implementation_rejected(tiny):
    featurizer, head, _ = tiny
    mask = select(featurizer, head)
    with pytest.raises(ValueError, match="'fused'"):
        apply_mask(featurizer, mask, implementation="fused")


def test_save_and_load_round_trip(tmp_path, tiny):
    featurizer, head, _ = tiny
    domains = make_domains()
    mask = select(featurizer, head, domains)
    optimizer = torch.optim.AdamW(list(featurizer.parameters()) + list(head.parameters()),
                                  lr=1e-2, weight_decay=0.1)
    masked = apply_mask(featurizer, mask, optimizer)
    train_steps(featurizer, head, optimizer, domains, steps=5)
    path = tmp_path / "mask.pt"
    save_masked_weights(path, masked, {"model_name": "jps-vit-tiny"})
    assert path.stat().st_size < 20_000

    fresh, _, _ = build_tiny(seed=0)
    loaded = load_masked_weights(path, fresh)
    assert loaded.mask.equals(mask)
    for name, param in featurizer.named_parameters():
        assert torch.equal(param, dict(fresh.named_parameters())[name]), name


def test_load_onto_other_weights_rejected(tmp_path, tiny):
    featurizer, head, _ = tiny
    masked = apply_mask(featurizer, select(featurizer, head))
    path = tmp_path / "mask.pt"
    save_masked_weights(path, masked)
    other, other_head, _ = build_tiny(seed=7)
    optimizer = torch.optim.AdamW(list(other.parameters()) + list(other_head.parameters()))
    groups_before = [list(group["params"]) for group in optimizer.param_groups]
    with pytest.raises(ValueError, match="differ from those the mask was trained on"):
        load_masked_weights(path, other, optimizer, implementation="sparse")

    # A rejected file changes nothing: no frozen parameter, no rewritten optimizer.
    assert all(param.requires_grad for param in other.parameters())
    assert [list(group["params"]) for group in optimizer.param_groups] == groups_before
    assert all("forward" not in module.__dict__ for module in other.modules())


def test_mask_for_other_model_rejected(tiny):
    featurizer, head, _ = tiny
    mask = select(featurizer, head)
    with pytest.raises(ValueError, match="has no parameter named"):
        apply_mask(head, mask)
