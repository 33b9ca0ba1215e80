"""The importance and variance operators on hand-made gradients."""

import logging
import math

import pytest
import torch

from jps_domainbed.selection import (JointSelector, NonFiniteGradientError,
                                     SelectionConfig, importance_operator,
                                     joint_selection, top_fraction_mask)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def indices(mask):
    return torch.nonzero(mask).flatten().tolist()


def test_importance_keeps_intersection_across_domains():
    gradients = [
        t(5, 4, 3, 2, 1, 0, 0, 0, 0, 0),   # top 3: {0, 1, 2}
        t(1, 6, 5, 4, 0, 0, 0, 0, 0, 0),   # top 3: {1, 2, 3}
        t(-7, -8, 9, 0, 0, 0, 0, 0, 0, 0),  # top 3 by |G|: {0, 1, 2}
    ]
    assert indices(importance_operator(gradients, rho=0.3)) == [1, 2]


def test_importance_ties_go_to_lower_index():
    assert indices(top_fraction_mask(t(1, 1, 1, 1), rho=0.5)) == [0, 1]
    assert indices(top_fraction_mask(t(2, 1, 1, 1), rho=0.5)) == [0, 1]
    assert indices(top_fraction_mask(t(1, 3, 1, 3, 1), rho=0.6)) == [0, 1, 3]


def test_importance_never_keeps_zero_gradient():
    assert indices(top_fraction_mask(t(0, 2, 0, 0), rho=1.0)) == [1]
    assert indices(top_fraction_mask(t(0, 0, 0, 0), rho=0.5)) == []


def test_variance_orders_survivors():
    # Per-entry population variance over two domains is (difference / 2)^2:
    # [0, 1, 0.25, 0.0625], so the two smallest are entries 0 and 3.
    gradients = [t(1, 2, 3, 4), t(1, 4, 2, 4.5)]
    assert joint_selection(gradients, k=2, rho=1.0).tolist() == [0, 3]
    assert joint_selection(gradients, k=3, rho=1.0).tolist() == [0, 2, 3]


def test_normalized_variance_differs_from_plain():
    # plain: [0.04, 0.25] -> entry 0; normalized by mean |G| squared:
    # [0.04 / 1.2^2, 0.25 / 10.5^2] = [0.0278, 0.00227] -> entry 1.
    gradients = [t(1, 10), t(1.4, 11)]
    assert joint_selection(gradients, k=1, rho=1.0, variance="plain").tolist() == [0]
    assert joint_selection(gradients, k=1, rho=1.0, variance="normalized").tolist() == [1]


def test_variance_ties_go_to_lower_index():
    gradients = [t(1, 2, 3), t(2, 3, 4)]   # every variance is 0.25
    assert joint_selection(gradients, k=2, rho=1.0).tolist() == [0, 1]


def test_fewer_survivors_than_k_selects_all(caplog):
    gradients = [t(5, 4, 3, 2, 1, 0, 0, 0, 0, 0), t(1, 6, 5, 4, 0, 0, 0, 0, 0, 0)]
    with caplog.at_level(logging.WARNING, logger="jps_domainbed.selection"):
        selected = joint_selection(gradients, k=5, rho=0.3)
    assert selected.tolist() == [1, 2]
    assert "fewer than k=5" in caplog.text


def test_single_domain_ranks_by_magnitude(caplog):
    with caplog.at_level(logging.WARNING, logger="jps_domainbed.selection"):
        selected = joint_selection([t(3, -5, 1, 4)], k=2, rho=1.0)
    assert selected.tolist() == [1, 3]
    assert "variance across domains is undefined" in caplog.text


def test_statistics_cover_only_survivors():
    selector = JointSelector(10, k=1, rho=0.3)
    selector.add_domain(t(5, 4, 3, 2, 1, 0, 0, 0, 0, 0))
    selector.add_domain(t(1, 6, 5, 4, 0, 0, 0, 0, 0, 0))
    assert selector.survivors.tolist() == [1, 2]
    assert selector.scores().numel() == 2
    # Entries 1 and 2: values (4, 6) and (3, 5), variance 1 each.
    assert selector.scores().tolist() == [1.0, 1.0]
    assert selector.select().tolist() == [1]


@pytest.mark.parametrize("k", [0, -3, 11, 2.5, True])
def test_k_out_of_range_rejected(k):
    with pytest.raises(ValueError, match=f"k={k}|k must be a positive integer, got {k!r}"):
        JointSelector(10, k=k, rho=0.5)


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, math.nan])
def test_rho_out_of_range_rejected(rho):
    with pytest.raises(ValueError, match="rho must be in"):
        JointSelector(10, k=2, rho=rho)


def test_unknown_variance_mode_rejected():
    with pytest.raises(ValueError, match="'std'"):
        SelectionConfig(variance="std").validate()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gradient_names_domain(bad):
    selector = JointSelector(4, k=1, rho=1.0)
    selector.add_domain(t(1, 2, 3, 4), "photo")
    with pytest.raises(NonFiniteGradientError, match="source domain sketch"):
        selector.add_domain(t(1, bad, 3, 4), "sketch")


def test_gradient_size_mismatch_rejected():
    selector = JointSelector(4, k=1, rho=1.0)
    with pytest.raises(ValueError, match="has 3 entries, expected 4"):
        selector.add_domain(t(1, 2, 3), "art")
