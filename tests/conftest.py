"""Shared fixtures: a tiny open_clip ViT with random weights, built on purpose."""

import logging

import pytest
import torch

from jps_domainbed import install_domainbed
from jps_domainbed.clip_featurizer import CLIPSpec, build_clip_featurizer

TINY_MODEL = "jps-vit-tiny"


def build_tiny(seed=0, input_shape=(3, 32, 32), image_size=32, num_classes=5):
    """Return (featurizer, head, clip_model) with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    spec = CLIPSpec(TINY_MODEL, pretrained="none", image_size=image_size)
    featurizer, clip_model = build_clip_featurizer(input_shape, spec)
    head = torch.nn.Linear(featurizer.n_outputs, num_classes)
    return featurizer, head, clip_model


def make_domains(num_domains=3, batches=2, batch_size=8, shape=(3, 32, 32), num_classes=5, seed=1):
    """Random source-domain minibatches; each domain has its own input shift."""
    generator = torch.Generator().manual_seed(seed)
    domains = []
    for domain in range(num_domains):
        domains.append([
            (torch.randn(batch_size, *shape, generator=generator) + 0.3 * domain,
             torch.randint(0, num_classes, (batch_size,), generator=generator))
            for _ in range(batches)])
    return domains


@pytest.fixture
def tiny():
    return build_tiny()


@pytest.fixture(autouse=True)
def _quiet_open_clip():
    logging.getLogger().setLevel(logging.WARNING)
    yield


@pytest.fixture(scope="session")
def pristine_tree(tmp_path_factory):
    """A pristine DomainBed tree of the pinned commit; tests must not modify it."""
    try:
        source, _ = install_domainbed.resolve_source(None, no_network=True)
    except install_domainbed.InstallError:
        pytest.skip(
            "No DomainBed source: ${} is unset and the cache archive {} is "
            "missing. Run `make domainbed` or set ${}.".format(
                install_domainbed.SOURCE_ENV_VAR, install_domainbed.cache_archive_path(),
                install_domainbed.SOURCE_ENV_VAR))
    return install_domainbed.stage_pristine_tree(source, tmp_path_factory.mktemp("pristine"))
