"""The stock DomainBed scripts running JPS, each in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from domainbed_support import REPO_ROOT, requires_domainbed, run_module

pytestmark = [requires_domainbed, pytest.mark.domainbed]

TINY_HPARAMS = {
    "clip_model": "jps-vit-tiny", "clip_pretrained": "none", "clip_image_size": 32,
    "head_init": "random", "batch_size": 8,
    "jps_k": 100, "jps_rho": 0.2, "jps_selection_batches": 2,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    run_module("jps_domainbed.mnist_data", "--data_dir", path)
    return path


def train(data_dir, output_dir, *extra, dataset="RotatedMNIST", steps=5):
    return run_module(
        "domainbed.scripts.train", "--data_dir", data_dir, "--dataset", dataset,
        "--algorithm", "JPS", "--test_envs", "0", "--steps", steps,
        "--output_dir", output_dir, "--hparams", json.dumps(TINY_HPARAMS), *extra)


def test_train_writes_outputs_and_reloads(data_dir, tmp_path):
    output_dir = tmp_path / "job"
    train(data_dir, output_dir)

    for name in ("results.jsonl", "model.pkl", "done", "out.txt"):
        assert (output_dir / name).is_file(), name
    records = [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4
    assert records[-1]["hparams"]["jps_k"] == 100
    assert {f"env{env}_in_acc" for env in range(6)} <= set(records[-1])

    from domainbed import algorithms

    saved = torch.load(output_dir / "model.pkl", weights_only=False)
    state = saved["model_dict"]
    assert state["mask"] is not None
    restored = algorithms.get_algorithm_class("JPS")(
        saved["model_input_shape"], saved["model_num_classes"], saved["model_num_domains"],
        saved["model_hparams"])
    restored.load_state_dict(state)
    assert restored.mask.num_selected == 100

    # The saved encoder and head, loaded by hand without JPS, predict exactly
    # what the reloaded JPS predicts.
    from jps_domainbed.algorithms import ClassifierHead
    from jps_domainbed.clip_featurizer import CLIPSpec, build_clip_featurizer

    featurizer, _ = build_clip_featurizer(saved["model_input_shape"], CLIPSpec(**state["clip"]))
    featurizer.load_state_dict(state["encoder"])
    head = ClassifierHead(featurizer.n_outputs, saved["model_num_classes"], normalize_features=False)
    head.load_state_dict(state["head"])
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(restored.predict(x), head(featurizer(x)))

    for name, index in state["mask"]["indices"].items():
        assert torch.equal(restored.mask.indices[name], index)
    for name, values in state["selected_values"].items():
        assert torch.equal(restored.masked.selected_values()[name], values)
        index = state["mask"]["indices"][name]
        assert torch.equal(state["encoder"][name].flatten()[index], values)


DRIVER = """
import runpy, sys
import torch
from domainbed import datasets

original = datasets.RotatedMNIST.rotate_dataset

def poisoned(self, images, labels, angle):
    dataset = original(self, images, labels, angle)
    if angle == 0:  # environment 0, the test environment
        dataset.tensors = (torch.full_like(dataset.tensors[0], float("nan")), dataset.tensors[1])
    return dataset

datasets.RotatedMNIST.rotate_dataset = poisoned
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("domainbed.scripts.train", run_name="__main__")
"""


def test_test_environment_never_reaches_training(data_dir, tmp_path):
    # Environment 0 is all NaN: selection would raise on it, and a training
    # step on it would make every weight NaN.
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    output_dir = tmp_path / "job"
    result = subprocess.run(
        [sys.executable, str(driver), "--data_dir", str(data_dir), "--dataset", "RotatedMNIST",
         "--algorithm", "JPS", "--test_envs", "0", "--steps", "4", "--output_dir", str(output_dir),
         "--hparams", json.dumps(TINY_HPARAMS)],
        capture_output=True, text=True, env=dict(os.environ, JPS_OFFLINE="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    state = torch.load(output_dir / "model.pkl", weights_only=False)["model_dict"]
    for name, tensor in {**state["encoder"], **state["head"]}.items():
        assert torch.isfinite(tensor).all(), name
    record = json.loads((output_dir / "results.jsonl").read_text().splitlines()[-1])
    assert record["env1_in_acc"] > 0.0


def test_sweep_and_collect_results(data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_module(
        "domainbed.scripts.sweep", "launch", "--datasets", "ColoredMNIST",
        "--algorithms", "JPS", "ERM", "--data_dir", data_dir, "--output_dir", sweep_dir,
        "--command_launcher", "local", "--n_hparams", "1", "--n_trials", "1",
        "--single_test_envs", "--steps", "3", "--hparams", json.dumps(TINY_HPARAMS),
        "--skip_confirmation", timeout=900)
    done = sorted(path.parent.name for path in sweep_dir.glob("*/done"))
    assert len(done) == 6  # 3 test environments x 2 algorithms

    result = run_module("domainbed.scripts.collect_results", "--input_dir", sweep_dir)
    rows = [line for line in result.stdout.splitlines() if line.startswith("JPS ")]
    assert rows, result.stdout
    assert any(line.startswith("ERM ") for line in result.stdout.splitlines())

    top = run_module("domainbed.scripts.list_top_hparams", "--input_dir", sweep_dir,
                     "--dataset", "ColoredMNIST", "--algorithm", "JPS", "--test_env", "0")
    assert "jps_k" in top.stdout, top.stdout

    report_dir = tmp_path / "report"
    run_module("jps_domainbed.report", "--input_dir", sweep_dir, "--output_dir", report_dir)
    markdown = (report_dir / "report.md").read_text()
    assert "JPS" in markdown
    assert "ColoredMNIST" in markdown
    assert (report_dir / "report.tex").stat().st_size > 0
    assert (report_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_prints_jobs_without_data(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "sweeps" / "dry_run.sh")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path / "dry"),
                 DATA_DIR=str(tmp_path / "no-data-here")))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [line for line in result.stdout.splitlines() if line.startswith("Dummy launcher:")]
    assert len(jobs) == 660
    assert sum("--algorithm JPS " in job for job in jobs) == 330
    assert sum("--dataset DomainNet " in job and "--steps 15001" in job for job in jobs) == 6 * 3 * 5 * 2
    assert not (tmp_path / "no-data-here").exists()


def preflight(data_dir, *args, hparams=None):
    """Run the preflight check in a fresh process with the venv's python on PATH."""
    command = [sys.executable, "-m", "jps_domainbed.preflight", "--data_dir", str(data_dir),
               "--datasets", "RotatedMNIST", "--n_hparams", "1", "--n_trials", "1", *args]
    if hparams is not None:
        command += ["--hparams", json.dumps(hparams)]
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PATH=path))


def test_preflight_passes_demo_settings(data_dir):
    result = preflight(data_dir, "--algorithms", "JPS", "ERM", "--steps", "5", hparams=TINY_HPARAMS)
    assert result.returncode == 0, result.stderr
    assert "preflight: OK" in result.stdout


def test_preflight_catches_batch_larger_than_split(data_dir):
    result = preflight(data_dir, "--algorithms", "JPS", hparams=dict(TINY_HPARAMS, batch_size=4096))
    assert result.returncode == 1
    assert "fewer than batch_size=4096" in result.stderr
    assert "Lower batch_size to at most 667" in result.stderr


def test_preflight_catches_missing_data(tmp_path):
    result = preflight(tmp_path, "--algorithms", "JPS")
    assert result.returncode == 1
    assert "python -m jps_domainbed.mnist_data" in result.stderr


def test_preflight_catches_jps_settings(data_dir):
    result = preflight(data_dir, "--algorithms", "JPS", "CLIP_ERM", hparams=dict(TINY_HPARAMS, jps_k=10**6))
    assert result.returncode == 1
    assert "jps_k=1000000 is larger than the 32768 c_fc weights" in result.stderr

    result = preflight(data_dir, "--algorithms", "CLIP_ERM", hparams=dict(TINY_HPARAMS, clip_image_size=30))
    assert result.returncode == 1
    assert "image_size=30 is not a multiple of the patch size 8" in result.stderr

    result = preflight(data_dir, "--algorithms", "JPS", "--steps", "1", hparams=TINY_HPARAMS)
    assert result.returncode == 1
    assert "--steps 1 is fewer than jps_selection_batches=2" in result.stderr


def test_preflight_catches_invalid_hparams(data_dir, monkeypatch):
    monkeypatch.setenv("JPS_OFFLINE", "1")
    result = preflight(data_dir, "--algorithms", "JPS",
                       hparams=dict(TINY_HPARAMS, jps_update="sprase", jps_rho=1.5))
    assert result.returncode == 1
    assert "rho must be in (0, 1], got 1.5" in result.stderr

    result = preflight(data_dir, "--algorithms", "JPS", hparams=dict(TINY_HPARAMS, jps_update="sprase"))
    assert "jps_update must be one of ('sparse', 'dense'), got 'sprase'" in result.stderr

    result = preflight(data_dir, "--algorithms", "CLIP_LinearProbe", hparams=dict(TINY_HPARAMS, head_init="bogus"))
    assert result.returncode == 1
    assert "head_init must be 'random' or 'zeroshot', got 'bogus'" in result.stderr

    offline = {key: value for key, value in TINY_HPARAMS.items() if not key.startswith("clip_")}
    result = preflight(data_dir, "--algorithms", "CLIP_ERM", hparams=offline)
    assert result.returncode == 1
    assert "pretrained weights for model 'ViT-B-16' with tag 'openai' were not found" in result.stderr

    result = preflight(data_dir, "--algorithms", "CLIP_ERM",
                       hparams=dict(TINY_HPARAMS, clip_weights_file="/nonexistent/ViT.pt",
                                    clip_pretrained="openai", clip_model="ViT-B-16",
                                    clip_image_size=224))
    assert "'/nonexistent/ViT.pt'" in result.stderr


def test_preflight_catches_wrong_job_python(data_dir, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "python").chmod(0o755)
    command = [sys.executable, "-m", "jps_domainbed.preflight", "--data_dir", str(data_dir),
               "--datasets", "RotatedMNIST", "--algorithms", "ERM", "--n_hparams", "1",
               "--n_trials", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}"))
    assert result.returncode == 1
    assert f"`python` on PATH ({fake_bin / 'python'}) cannot import DomainBed" in result.stderr


@pytest.mark.parametrize("algorithm", ["JPS", "CLIP_ERM", "CLIP_LinearProbe"])
def test_random_hparams_for_every_dataset(algorithm):
    from domainbed import datasets, hparams_registry

    for dataset in datasets.DATASETS:
        default = hparams_registry.default_hparams(algorithm, dataset)
        for seed in range(3):
            hparams = hparams_registry.random_hparams(algorithm, dataset, seed)
            assert set(hparams) == set(default), dataset
            json.dumps(hparams, default=float)
            assert hparams["dataset"] == dataset
            if algorithm == "JPS":
                assert 1000 <= hparams["jps_k"] <= 5000
                assert 0 < hparams["jps_rho"] <= 0.05
            assert hparams["clip_image_size"] % 16 == 0
            assert hparams["lr"] > 0


def test_other_algorithms_hparams_untouched():
    from domainbed import hparams_registry

    erm = hparams_registry.default_hparams("ERM", "PACS")
    assert "clip_model" not in erm
    assert erm["lr"] == 5e-5
    assert erm["batch_size"] == 32
