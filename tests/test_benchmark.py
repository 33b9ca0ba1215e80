"""End-to-end run of the benchmark on the tiny model, and its option checks.

The run takes each method through its own child process, as a real
benchmark does. Times vary with machine load, so no test compares them.
"""

import json
import sys

import pytest
import torch

from jps_domainbed import benchmark

TINY_ARGS = ["--model", "jps-vit-tiny", "--image_size", "32", "--batch_size", "4",
             "--steps", "2", "--warmup", "1", "--k", "50", "--rho", "0.2",
             "--selection_batches", "1", "--device", "cpu", "--threads", "1"]

ROW_KEYS = ("method", "step_time_s", "peak_memory_bytes", "optimizer_state_bytes",
            "trainable_params", "checkpoint_bytes", "selection_s")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("benchmark") / "results.json"
    status = benchmark.main([*TINY_ARGS, "--json", str(path)])
    return status, json.loads(path.read_text())


def rows_by_method(report):
    return {row["method"]: row for row in report["results"]}


def test_tiny_run_exits_zero(tiny_report):
    status, _ = tiny_report
    assert status == 0


def test_tiny_config_describes_run(tiny_report):
    _, report = tiny_report
    config = report["config"]
    assert config["model"] == "jps-vit-tiny"
    assert config["image_size"] == 32
    assert config["batch_size"] == 4
    assert config["steps"] == 2
    assert config["device"] == "cpu"
    assert config["torch_version"] == torch.__version__
    assert config["machine"]["cpu_cores"] >= 1
    assert config["machine"]["cpu_model"]
    assert config["machine"]["gpu_name"] is None
    assert "load_average_start" in config


def test_tiny_rows_cover_methods(tiny_report):
    _, report = tiny_report
    rows = rows_by_method(report)
    assert list(rows) == list(benchmark.METHODS)
    for row in report["results"]:
        for key in ROW_KEYS:
            assert key in row, f"{row['method']} row lacks {key}"


def test_tiny_rows_have_positive_time_and_memory(tiny_report):
    _, report = tiny_report
    for row in report["results"]:
        assert not row["error"], f"{row['method']} failed: {row['reason']}"
        if row["skipped"]:
            assert row["method"] == "lora", f"{row['method']} skipped: {row['reason']}"
            assert row["reason"]
            continue
        assert row["step_time_s"] > 0, row["method"]
        assert len(row["step_times_s"]) == 2, row["method"]
        assert row["peak_memory_bytes"] > 0, row["method"]


def test_sparse_trains_less_than_erm(tiny_report):
    _, report = tiny_report
    rows = rows_by_method(report)
    sparse, erm = rows["jps_sparse"], rows["erm_full"]
    assert sparse["trainable_params"] < erm["trainable_params"]
    assert sparse["optimizer_state_bytes"] < erm["optimizer_state_bytes"]
    # The selected weights plus the head's 32 * 7 weights and 7 biases.
    assert sparse["trainable_params"] == report["selection"]["mask_size"] + 32 * 7 + 7


def test_jps_checkpoint_smaller_than_erm(tiny_report):
    _, report = tiny_report
    rows = rows_by_method(report)
    erm_bytes = rows["erm_full"]["checkpoint_bytes"]
    assert rows["jps_sparse"]["checkpoint_bytes"] < erm_bytes
    assert rows["jps_dense"]["checkpoint_bytes"] < erm_bytes


def test_floor_has_no_weight_gradients(tiny_report):
    _, report = tiny_report
    floor = rows_by_method(report)["floor"]
    assert floor["trainable_params"] == 0
    assert floor["optimizer_state_bytes"] == 0
    assert floor["checkpoint_bytes"] is None
    assert floor["selection_s"] is None


def test_selection_cost_only_on_jps_rows(tiny_report):
    _, report = tiny_report
    rows = rows_by_method(report)
    assert report["selection"]["selection_s"] > 0
    assert report["selection"]["mask_size"] <= 50
    for method in ("jps_sparse", "jps_dense"):
        assert rows[method]["selection_s"] == report["selection"]["selection_s"]
        assert rows[method]["selection_percent_of_reference_run"] > 0
    assert rows["erm_full"]["selection_s"] is None


def test_method_subset_skips_selection(tmp_path):
    path = tmp_path / "erm.json"
    status = benchmark.main([*TINY_ARGS, "--methods", "erm_full", "--json", str(path)])
    report = json.loads(path.read_text())
    assert status == 0
    assert [row["method"] for row in report["results"]] == ["erm_full"]
    assert report["selection"] is None


def test_table_shows_ratios(tiny_report):
    _, report = tiny_report
    table = benchmark.format_table(report)
    assert "step / ERM" in table
    assert "step / floor" in table
    assert "checkpoint / ERM" in table
    assert "| jps_sparse |" in table


def parse_tiny_args(*extra):
    parser = benchmark.build_parser()
    args = parser.parse_args([*TINY_ARGS, *extra])
    benchmark.validate_args(parser, args)
    return args


def test_lora_unmatched_target_is_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "LORA_TARGET_MODULES", ["no_such_layer"])
    row = benchmark.measure_method("lora", parse_tiny_args(), tmp_path)
    assert row["skipped"] is True
    assert "peft" in row["reason"]
    assert row["step_time_s"] is None


def test_checkpoint_without_domainbed_uses_fallback(monkeypatch, tmp_path):
    args = parse_tiny_args()
    benchmark.run_selection(args, tmp_path)
    monkeypatch.setattr(benchmark, "domainbed_unavailable_reason",
                        lambda: "DomainBed is not importable (test)")
    sparse = benchmark.measure_method("jps_sparse", args, tmp_path)
    erm = benchmark.measure_method("erm_full", args, tmp_path)
    assert "DomainBed is not importable (test)" in sparse["checkpoint_source"]
    assert "DomainBed is not importable (test)" in erm["checkpoint_source"]
    assert 0 < sparse["checkpoint_bytes"] < erm["checkpoint_bytes"]


def test_failed_worker_gives_error_row(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "worker_argv",
                        lambda args, method, workdir: [sys.executable, "-c", "raise SystemExit(3)"])
    row = benchmark.run_worker(parse_tiny_args(), "erm_full", tmp_path)
    assert row["error"] is True
    assert "exited with status 3" in row["reason"]
    assert row["step_time_s"] is None


@pytest.mark.parametrize("extra, message", [
    (["--methods", "jps_magic"], "invalid choice"),
    (["--image_size", "30"], "not a multiple of the patch size"),
    (["--model", "ViT-X-99"], "unknown open_clip model name"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--rho", "1.5"], "rho must be in (0, 1]"),
    (["--pretrained", "/nonexistent/weights.pt"], "does not exist"),
])
def test_bad_option_exits_with_message(extra, message, capsys):
    with pytest.raises(SystemExit) as raised:
        benchmark.main([*TINY_ARGS, *extra])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_gpu_exits_with_message(capsys):
    with pytest.raises(SystemExit) as raised:
        benchmark.main([*TINY_ARGS, "--device", "cuda"])
    assert raised.value.code == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
