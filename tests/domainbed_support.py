"""Helpers for tests that need the patched DomainBed.

Those tests skip, with the reason printed by ``pytest -rs``, when DomainBed
is not importable or not patched, and run against the real one otherwise.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "install it with `python -m jps_domainbed.install_domainbed` (or `make test`)"


def domainbed_skip_reason():
    """Return why DomainBed-backed tests cannot run, or None when they can."""
    try:
        algorithms = importlib.import_module("domainbed.algorithms")
    except ImportError as error:
        return f"DomainBed is not importable ({error}); {INSTALL_HINT}"
    if "JPS" not in algorithms.ALGORITHMS:
        return (f"DomainBed at {Path(algorithms.__file__).parent} is not patched for "
                f"plugins (JPS missing from ALGORITHMS); {INSTALL_HINT}")
    return None


requires_domainbed = pytest.mark.skipif(domainbed_skip_reason() is not None,
                                        reason=str(domainbed_skip_reason()))


def tiny_hparams(algorithm, dataset, **overrides):
    """DomainBed's default hparams for ``algorithm`` on a tiny random-init CLIP."""
    from domainbed import hparams_registry

    hparams = hparams_registry.default_hparams(algorithm, dataset)
    hparams.update(clip_model="jps-vit-tiny", clip_pretrained="none", clip_image_size=32,
                   batch_size=8)
    if algorithm == "JPS":
        hparams.update(jps_k=20, jps_rho=0.2, jps_selection_batches=2)
    hparams.update(overrides)
    return hparams


def run_module(module, *args, cwd=None, timeout=600, env=None):
    """Run ``python -m module args`` in a fresh process; fail with its output."""
    # DomainBed's sweep starts each job as `python -m ...`, found on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    environment = dict(os.environ, PYTHONUNBUFFERED="1", JPS_OFFLINE="1", PATH=path)
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                            env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"python -m {module} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result
