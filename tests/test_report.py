"""Tests for jps_domainbed.report and the data files it ships with.

The sweep fixtures are synthetic results.jsonl files in the format that
domainbed/scripts/train.py writes. Tests that compute accuracies need
DomainBed and skip with the reason when it cannot be imported.
"""

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jps_domainbed import report

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "jps_domainbed" / "data"

VLCS_ENVIRONMENTS = ["C", "L", "S", "V"]

# Selected test-domain accuracy of a job: BASE + 0.05 * test_env + OFFSET * trial_seed.
BASE = {"ERM": 0.60, "JPS": 0.70}
OFFSET = {"ERM": 0.02, "JPS": 0.04}

# Per hparams seed, two checkpoints (steps 0 and 100) as
# (mean training-domain out-split accuracy, test-domain out-split accuracy).
# Training-domain validation picks hparams seed 0 at step 100 (0.80 is the best
# validation accuracy). The oracle looks only at the last step of each hparams
# seed and picks hparams seed 1 (test out-split 0.60 > 0.40).
CHECKPOINTS = {
    0: [(0.70, 0.50), (0.80, 0.40)],
    1: [(0.60, 0.90), (0.75, 0.60)],
}
DECOY_ACCURACY = 0.99  # test in-split accuracy of checkpoints no method selects


def require_domainbed():
    pytest.importorskip(
        "domainbed.scripts.collect_results",
        reason="DomainBed is not importable: install it or put a DomainBed checkout on PYTHONPATH",
    )


def selected_accuracy(algorithm, test_env, trial_seed, oracle):
    accuracy = BASE[algorithm] + 0.05 * test_env + OFFSET[algorithm] * trial_seed
    # The oracle's checkpoint is 10 points lower, so the two methods differ.
    return accuracy - 0.10 if oracle else accuracy


def job_records(algorithm, test_envs, trial_seed, hparams_seed, output_dir):
    """Return the records train.py would write for one job."""
    args = {
        "algorithm": algorithm,
        "checkpoint_freq": None,
        "data_dir": "/data",
        "dataset": "VLCS",
        "holdout_fraction": 0.2,
        "hparams": None,
        "hparams_seed": hparams_seed,
        "output_dir": str(output_dir),
        "save_model_every_checkpoint": False,
        "seed": 1000 * trial_seed + 10 * hparams_seed + test_envs[0],
        "skip_model_save": True,
        "steps": 101,
        "task": "domain_generalization",
        "test_envs": list(test_envs),
        "trial_seed": trial_seed,
        "uda_holdout_fraction": 0,
    }
    records = []
    for step_index, (validation, test_out) in enumerate(CHECKPOINTS[hparams_seed]):
        step = 100 * step_index
        record = {"step": step, "epoch": step / 50.0, "loss": 0.5, "step_time": 0.1, "mem_gb": 0.0}
        for env in range(len(VLCS_ENVIRONMENTS)):
            if env in test_envs:
                record[f"env{env}_in_acc"] = DECOY_ACCURACY
                record[f"env{env}_out_acc"] = test_out
            else:
                record[f"env{env}_in_acc"] = 0.5
                record[f"env{env}_out_acc"] = validation
        if len(test_envs) == 1 and step_index == 1:
            record[f"env{test_envs[0]}_in_acc"] = selected_accuracy(
                algorithm, test_envs[0], trial_seed, oracle=hparams_seed == 1
            )
        record["hparams"] = {"batch_size": 32, "lr": 5e-5}
        record["args"] = args
        records.append(record)
    return records


def write_job(sweep_dir, algorithm, test_envs, trial_seed, hparams_seed, done=True):
    key = json.dumps([algorithm, list(test_envs), trial_seed, hparams_seed])
    job_dir = sweep_dir / hashlib.md5(key.encode("utf-8")).hexdigest()
    job_dir.mkdir(parents=True)
    records = job_records(algorithm, test_envs, trial_seed, hparams_seed, job_dir)
    with open(job_dir / "results.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
    if done:
        (job_dir / "done").write_text("done")
    return job_dir


def make_sweep(sweep_dir, skip=(), not_done=(), pairs=False):
    """Write 2 algorithms x 4 VLCS test domains x 2 trials x 2 hparams seeds.

    skip and not_done contain (algorithm, test_env, trial_seed, hparams_seed)
    tuples. None in a tuple matches every value.
    """

    def matches(patterns, job):
        return any(all(p is None or p == v for p, v in zip(pattern, job)) for pattern in patterns)

    job_dirs = {}
    for algorithm in ("ERM", "JPS"):
        for test_env in range(len(VLCS_ENVIRONMENTS)):
            for trial_seed in (0, 1):
                for hparams_seed in (0, 1):
                    job = (algorithm, test_env, trial_seed, hparams_seed)
                    if matches(skip, job):
                        continue
                    job_dirs[job] = write_job(
                        sweep_dir, algorithm, [test_env], trial_seed, hparams_seed,
                        done=not matches(not_done, job),
                    )
    if pairs:
        # Jobs with two test domains, as a sweep without --single_test_envs launches.
        for algorithm in ("ERM", "JPS"):
            for trial_seed in (0, 1):
                write_job(sweep_dir, algorithm, [0, 1], trial_seed, 0)
    return job_dirs


def run_report(sweep_dir, output_dir, *extra):
    exit_code = report.main(
        ["--input_dir", str(sweep_dir), "--output_dir", str(output_dir), "--log_level", "WARNING", *extra]
    )
    assert exit_code == 0
    return (output_dir / "report.md").read_text()


def markdown_table(markdown, title):
    """Parse the Markdown table under '### title' into {row label: [cells]}."""
    lines = markdown.splitlines()
    start = lines.index(f"### {title}")
    rows = {}
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    header = [cell.strip() for cell in lines[start + 2].strip().strip("|").split(" | ")]
    return header, rows


def collect_results_tables(sweep_dir):
    """Run DomainBed's collect_results and parse its text tables.

    Returns {(title, selection method name): {algorithm: [cells]}}, where title
    is the dataset name or "Averages".
    """
    completed = subprocess.run(
        [sys.executable, "-m", "domainbed.scripts.collect_results", "--input_dir", str(sweep_dir)],
        capture_output=True, text=True, check=True,
    )
    tables = {}
    lines = completed.stdout.splitlines()
    header_pattern = re.compile(
        r"^-------- (?:Dataset: (?P<dataset>\S+), model selection method|Averages, model selection method): (?P<method>.+)$"
    )
    for index, line in enumerate(lines):
        match = header_pattern.match(line)
        if not match:
            continue
        title = match.group("dataset") or "Averages"
        rows = {}
        for row_line in lines[index + 2:]:
            if not row_line.strip() or row_line.startswith("--------"):
                break
            cells = re.split(r"\s{2,}", row_line.strip())
            rows[cells[0]] = cells[1:]
        tables[(title, match.group("method").strip())] = rows
    return tables


# Report section label -> collect_results' selection method name.
COLLECT_RESULTS_METHODS = {
    report.TRAINING_DOMAIN_VALIDATION: "training-domain validation set",
    report.ORACLE: "test-domain validation set (oracle)",
}


def sweep_rows(rows):
    """Keep the measured rows and strip the '(this sweep)' mark."""
    suffix = " " + report.SWEEP_MARK
    return {label[: -len(suffix)]: cells for label, cells in rows.items() if label.endswith(suffix)}


# --------------------------------------------------------------------------
# (a) hand-computed cells


def test_complete_sweep_cells(tmp_path):
    require_domainbed()
    make_sweep(tmp_path / "sweep")
    markdown = run_report(tmp_path / "sweep", tmp_path / "out", "--no-reference")

    # Training-domain validation selects BASE + 0.05 * env + OFFSET * trial.
    # ERM, env 0: trials 0.60 and 0.62 give mean 61.0 and np.std 0.01 / sqrt(2) = 0.7.
    # JPS, env 0: trials 0.70 and 0.74 give mean 72.0 and np.std 0.02 / sqrt(2) = 1.4.
    header, rows = markdown_table(markdown, "VLCS, training-domain validation")
    assert header == ["Algorithm", "C", "L", "S", "V", "Avg"]
    assert rows["ERM (this sweep)"] == ["61.0 ± 0.7", "66.0 ± 0.7", "71.0 ± 0.7", "76.0 ± 0.7", "68.5"]
    assert rows["JPS (this sweep)"] == ["72.0 ± 1.4", "77.0 ± 1.4", "82.0 ± 1.4", "87.0 ± 1.4", "79.5"]

    # The oracle selects the checkpoint that is 10 points lower.
    _, rows = markdown_table(markdown, "VLCS, test-domain validation (oracle)")
    assert rows["ERM (this sweep)"] == ["51.0 ± 0.7", "56.0 ± 0.7", "61.0 ± 0.7", "66.0 ± 0.7", "58.5"]
    assert rows["JPS (this sweep)"] == ["62.0 ± 1.4", "67.0 ± 1.4", "72.0 ± 1.4", "77.0 ± 1.4", "69.5"]

    # Overall: ERM trial means 0.675 and 0.695 -> 68.5 ± 0.7;
    # JPS trial means 0.775 and 0.815 -> 79.5 ± 1.4.
    header, rows = markdown_table(markdown, "Average over test domains, training-domain validation")
    assert header == ["Algorithm", "VLCS", "Avg"]
    assert rows["ERM (this sweep)"] == ["68.5 ± 0.7", "68.5"]
    assert rows["JPS (this sweep)"] == ["79.5 ± 1.4", "79.5"]
    _, rows = markdown_table(markdown, "Average over test domains, test-domain validation (oracle)")
    assert rows["ERM (this sweep)"] == ["58.5 ± 0.7", "58.5"]
    assert rows["JPS (this sweep)"] == ["69.5 ± 1.4", "69.5"]

    assert "Nothing is missing" in markdown


def test_complete_sweep_writes_three_files(tmp_path):
    require_domainbed()
    make_sweep(tmp_path / "sweep")
    run_report(tmp_path / "sweep", tmp_path / "out")

    for name in report.REPORT_FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latex = (tmp_path / "out" / "report.tex").read_text()
    assert latex.startswith("\\documentclass{article}")
    assert latex.rstrip().endswith("\\end{document}")
    assert "61.0 $\\pm$ 0.7" in latex


# --------------------------------------------------------------------------
# (b) parity with collect_results


def incomplete_sweep(sweep_dir):
    job_dirs = make_sweep(
        sweep_dir,
        skip=[
            ("ERM", 3, None, None),  # test domain V never ran for ERM
            ("JPS", 2, 1, None),  # trial 1 of JPS on test domain S is missing
            ("ERM", 1, 0, 1),  # hparams seed 1 of ERM, test domain L, trial 0 is missing
        ],
        not_done=[("JPS", 0, 0, 1)],
    )
    (sweep_dir / "launched_but_empty").mkdir()
    return job_dirs


SWEEP_VARIANTS = {
    "complete": lambda sweep_dir: make_sweep(sweep_dir),
    "incomplete": incomplete_sweep,
    "with_two_test_domain_jobs": lambda sweep_dir: make_sweep(sweep_dir, pairs=True),
}


@pytest.mark.parametrize("variant", sorted(SWEEP_VARIANTS))
def test_numbers_match_collect_results(tmp_path, variant):
    require_domainbed()
    sweep_dir = tmp_path / "sweep"
    SWEEP_VARIANTS[variant](sweep_dir)
    markdown = run_report(sweep_dir, tmp_path / "out", "--no-reference")
    expected_tables = collect_results_tables(sweep_dir)

    compared = 0
    for label, method in COLLECT_RESULTS_METHODS.items():
        for title, report_title in [
            ("VLCS", f"VLCS, {label}"),
            ("Averages", f"Average over test domains, {label}"),
        ]:
            expected = expected_tables[(title, method)]
            _, rows = markdown_table(markdown, report_title)
            measured = {
                algorithm: [cell.replace("±", "+/-") for cell in cells]
                for algorithm, cells in sweep_rows(rows).items()
            }
            assert measured == expected, report_title
            compared += 1
    assert compared == 4


def test_shipped_sweep_matches_collect_results(tmp_path):
    """Compare on the real VLCS sweep that DomainBed ships for its own tests."""
    require_domainbed()
    import domainbed

    shipped = Path(domainbed.__file__).parent / "misc" / "test_sweep_data"
    if not shipped.is_dir():
        pytest.skip(f"{shipped} is not part of this DomainBed installation")
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(shipped, sweep_dir)

    markdown = run_report(sweep_dir, tmp_path / "out", "--no-reference")
    expected_tables = collect_results_tables(sweep_dir)

    for label, method in COLLECT_RESULTS_METHODS.items():
        _, rows = markdown_table(markdown, f"VLCS, {label}")
        measured = {a: [c.replace("±", "+/-") for c in cells] for a, cells in sweep_rows(rows).items()}
        assert measured == expected_tables[("VLCS", method)], label
    # Values from DomainBed's misc/test_sweep_results.txt.
    _, rows = markdown_table(markdown, f"VLCS, {report.TRAINING_DOMAIN_VALIDATION}")
    assert rows["ERM (this sweep)"] == ["98.0 ± 0.2", "64.2 ± 0.8", "74.1 ± 0.4", "77.1 ± 0.2", "78.3"]


# --------------------------------------------------------------------------
# (c) incomplete sweeps


def test_incomplete_sweep_lists_missing(tmp_path):
    require_domainbed()
    sweep_dir = tmp_path / "sweep"
    job_dirs = incomplete_sweep(sweep_dir)
    markdown = run_report(sweep_dir, tmp_path / "out", "--no-reference")

    for name in report.REPORT_FILES:
        assert (tmp_path / "out" / name).is_file(), name

    missing = markdown[markdown.index("## Missing"):]
    assert "VLCS, ERM, test domain V (env 3): no results" in missing
    assert "VLCS, JPS, test domain S (env 2): trial seed(s) 1" in missing
    assert "VLCS, ERM, test domain L (env 1), trial seed 0: hparams seed(s) 1" in missing
    assert str(job_dirs[("JPS", 0, 0, 1)]) in missing
    assert "Jobs without a done file (still running or failed)" in missing
    assert f"{sweep_dir / 'launched_but_empty'}: not started" in missing

    # ERM, V: no records -> "X", so the Avg is "X" too.
    # JPS, S: only trial 0 (0.80) -> 80.0 ± 0.0; Avg (72 + 77 + 80 + 87) / 4 = 79.0.
    _, rows = markdown_table(markdown, "VLCS, training-domain validation")
    assert rows["ERM (this sweep)"] == ["61.0 ± 0.7", "66.0 ± 0.7", "71.0 ± 0.7", "X", "X"]
    assert rows["JPS (this sweep)"] == ["72.0 ± 1.4", "77.0 ± 1.4", "80.0 ± 0.0", "87.0 ± 1.4", "79.0"]

    # Without hparams seed 1, the oracle's only choice for ERM, L, trial 0 is
    # hparams seed 0 (0.65); trial 1 keeps 0.57 -> mean 61.0, np.std 0.04 / sqrt(2) -> 2.8.
    _, rows = markdown_table(markdown, "VLCS, test-domain validation (oracle)")
    assert rows["ERM (this sweep)"][1] == "61.0 ± 2.8"

    # Trials average the domains they have: ERM (0.60+0.65+0.70)/3 = 0.65 and
    # 0.67 -> 66.0 ± 0.7; JPS 0.775 and (0.74+0.79+0.89)/3 = 0.80667
    # -> mean 79.08, np.std 0.01583 / sqrt(2) = 0.0112 -> 79.1 ± 1.1.
    _, rows = markdown_table(markdown, "Average over test domains, training-domain validation")
    assert rows["ERM (this sweep)"] == ["66.0 ± 0.7", "66.0"]
    assert rows["JPS (this sweep)"] == ["79.1 ± 1.1", "79.1"]


def test_missing_items_logged_as_warnings(tmp_path, caplog):
    require_domainbed()
    sweep_dir = tmp_path / "sweep"
    incomplete_sweep(sweep_dir)
    with caplog.at_level("WARNING", logger=report.logger.name):
        run_report(sweep_dir, tmp_path / "out")
    messages = [record.getMessage() for record in caplog.records]
    assert any("VLCS, ERM, test domain V (env 3): no results" in message for message in messages)
    assert any("missing item(s)" in message for message in messages)


def test_partly_written_line_is_skipped(tmp_path):
    require_domainbed()
    sweep_dir = tmp_path / "sweep"
    job_dirs = make_sweep(sweep_dir)
    results = job_dirs[("JPS", 3, 1, 0)] / "results.jsonl"
    with open(results, "a") as handle:
        handle.write('{"args": {"dataset": "VL')  # a checkpoint being written
    (job_dirs[("JPS", 3, 1, 0)] / "done").unlink()

    markdown = run_report(sweep_dir, tmp_path / "out", "--no-reference")

    missing = markdown[markdown.index("## Missing"):]
    assert f"{results}: 1 line(s) skipped" in missing
    _, rows = markdown_table(markdown, "VLCS, training-domain validation")
    assert rows["JPS (this sweep)"] == ["72.0 ± 1.4", "77.0 ± 1.4", "82.0 ± 1.4", "87.0 ± 1.4", "79.5"]


def test_empty_sweep_writes_files(tmp_path):
    require_domainbed()
    (tmp_path / "sweep").mkdir()
    markdown = run_report(tmp_path / "sweep", tmp_path / "out")
    assert "No records found" in markdown
    for name in report.REPORT_FILES:
        assert (tmp_path / "out" / name).is_file(), name


def test_requested_dataset_without_records(tmp_path):
    require_domainbed()
    make_sweep(tmp_path / "sweep")
    markdown = run_report(tmp_path / "sweep", tmp_path / "out", "--datasets", "VLCS", "PACS")
    missing = markdown[markdown.index("## Missing"):]
    assert "### Datasets without records\n\n- PACS" in missing
    assert "### VLCS, training-domain validation" in markdown


def test_unknown_dataset_gets_numbered_domains(tmp_path):
    require_domainbed()
    sweep_dir = tmp_path / "sweep"
    job_dir = write_job(sweep_dir, "ERM", [0], 0, 0)
    lines = []
    for line in (job_dir / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["args"]["dataset"] = "MyDataset"
        lines.append(json.dumps(record, sort_keys=True))
    (job_dir / "results.jsonl").write_text("\n".join(lines) + "\n")

    markdown = run_report(sweep_dir, tmp_path / "out", "--no-reference")

    header, rows = markdown_table(markdown, "MyDataset, training-domain validation")
    assert header == ["Algorithm", "env0", "env1", "env2", "env3", "Avg"]
    assert rows["ERM (this sweep)"] == ["60.0 ± 0.0", "X", "X", "X", "X"]


def test_missing_input_dir_exits_with_error(tmp_path):
    exit_code = report.main(["--input_dir", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "out")])
    assert exit_code == 2


# --------------------------------------------------------------------------
# (d) published reference rows


def test_packaged_reference_rows_marked_published(tmp_path):
    require_domainbed()
    make_sweep(tmp_path / "sweep")
    markdown = run_report(tmp_path / "sweep", tmp_path / "out")

    _, rows = markdown_table(markdown, "VLCS, training-domain validation")
    published = {label: cells for label, cells in rows.items() if "(published)" in label}
    # VLCS column of the ERM row in SWAD's main table (ERM reproduced, ResNet-50).
    assert published["ERM, ResNet-50 ImageNet (published) [1]"] == ["", "", "", "", "77.3"]
    assert published["MIRO + SWAD, RegNetY-16GF SWAG (published) [2]"] == ["", "", "", "", "81.7"]
    # The oracle tables have no published rows: every source row is training-domain validation.
    _, rows = markdown_table(markdown, "VLCS, test-domain validation (oracle)")
    assert not [label for label in rows if "(published)" in label]

    sources = markdown[markdown.index("## Sources of published rows"):]
    assert "- [1] SWAD: Domain Generalization by Seeking Flat Minima" in sources
    assert "- [2] Domain Generalization by Mutual-Information Regularization" in sources
    assert "(published)" in (tmp_path / "out" / "report.tex").read_text()


def test_custom_reference_csv(tmp_path):
    require_domainbed()
    make_sweep(tmp_path / "sweep")
    reference_csv = tmp_path / "reference.csv"
    reference_csv.write_text(
        "algorithm,backbone,selection_method,PACS,VLCS,OfficeHome,TerraIncognita,DomainNet,Avg,source,notes\n"
        "Baseline,CLIP ViT-B/16,training-domain validation,90.0,80.0,,,,85.0,Example paper,\n"
        "Oracle baseline,CLIP ViT-B/16,test-domain validation (oracle),,70.0,,,,,Other paper,\n"
        "Average only,CLIP ViT-B/16,training-domain validation,,,,,,76.6,Brief,\n"
    )
    markdown = run_report(tmp_path / "sweep", tmp_path / "out", "--reference_csv", str(reference_csv))

    _, rows = markdown_table(markdown, "VLCS, training-domain validation")
    assert rows["Baseline, CLIP ViT-B/16 (published) [1]"] == ["", "", "", "", "80.0"]
    _, rows = markdown_table(markdown, "VLCS, test-domain validation (oracle)")
    assert rows["Oracle baseline, CLIP ViT-B/16 (published) [2]"] == ["", "", "", "", "70.0"]

    # This sweep covers VLCS only, so the published Avg is recomputed over VLCS.
    _, rows = markdown_table(markdown, "Average over test domains, training-domain validation")
    assert rows["Baseline, CLIP ViT-B/16 (published) [1]"] == ["80.0", "80.0†"]
    # A row with only a five-dataset average has no number for this sweep's datasets.
    assert not [label for label in rows if label.startswith("Average only")]


def test_no_reference_option(tmp_path):
    require_domainbed()
    make_sweep(tmp_path / "sweep")
    markdown = run_report(tmp_path / "sweep", tmp_path / "out", "--no-reference")
    assert "(published)" not in markdown
    assert "## Sources of published rows" not in markdown


def test_published_average_needs_all_five_datasets():
    row = report.ReferenceResult(
        algorithm="JPS", backbone="CLIP ViT-B/16", selection_method=report.TRAINING_DOMAIN_VALIDATION,
        accuracies={}, average=76.6, source="s", year="", table="", retrieved_from="", notes="",
    )
    assert report._published_average(row, list(report.REFERENCE_DATASETS)).render("±", "†") == "76.6"
    assert report._published_average(row, ["VLCS"]).render("±", "†") == ""


# --------------------------------------------------------------------------
# Command line entry point


def test_module_entry_point(tmp_path):
    require_domainbed()
    make_sweep(tmp_path / "sweep")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    completed = subprocess.run(
        [sys.executable, "-m", "jps_domainbed.report", "--input_dir", str(tmp_path / "sweep"),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=environment,
    )
    assert completed.returncode == 0, completed.stderr
    assert "wrote" in completed.stderr
    for name in report.REPORT_FILES:
        assert (tmp_path / "out" / name).is_file(), name


def test_help_mentions_units():
    help_text = report.build_parser().format_help()
    assert "%" in help_text
    assert "--no-reference" in help_text


# --------------------------------------------------------------------------
# Data files


EXPECTED_CLASS_COUNTS = {"PACS": 7, "VLCS": 5, "OfficeHome": 65, "TerraIncognita": 10, "DomainNet": 345}


def test_class_names_counts_and_order():
    class_names = json.loads((DATA_DIR / "class_names.json").read_text())
    for dataset, count in EXPECTED_CLASS_COUNTS.items():
        names = class_names[dataset]
        assert len(names) == count, dataset
        assert len(set(names)) == count, dataset
        # torchvision's ImageFolder numbers classes in sorted() order.
        assert names == sorted(names), dataset
        assert dataset in class_names["_sources"], dataset


def test_class_names_known_folders():
    class_names = json.loads((DATA_DIR / "class_names.json").read_text())
    assert class_names["DomainNet"][:3] == ["The_Eiffel_Tower", "The_Great_Wall_of_China", "The_Mona_Lisa"]
    assert class_names["OfficeHome"][-3:] == ["Toys", "Trash_Can", "Webcam"]
    assert class_names["TerraIncognita"][0] == "bird"


def test_reference_csv_loads():
    rows = report.load_reference_results()
    algorithms = {row.algorithm for row in rows}
    assert {"ERM", "SWAD", "MIRO", "MIRO + SWAD", "JPS"} <= algorithms
    for row in rows:
        assert row.source, row
        assert row.selection_method == report.TRAINING_DOMAIN_VALIDATION, row
        if len(row.accuracies) == len(report.REFERENCE_DATASETS) and row.average is not None:
            # Published averages come from unrounded numbers, so allow 0.1.
            mean = sum(row.accuracies.values()) / len(row.accuracies)
            assert abs(mean - row.average) <= 0.1, row


def test_reference_csv_jps_row_has_average_only():
    with open(DATA_DIR / "reference_results.csv", newline="") as handle:
        jps_rows = [row for row in csv.DictReader(handle) if row["algorithm"] == "JPS"]
    assert len(jps_rows) == 1
    assert jps_rows[0]["Avg"] == "76.6"
    assert all(jps_rows[0][name] == "" for name in report.REFERENCE_DATASETS)


def test_reference_csv_rejects_non_numbers(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(
        "algorithm,backbone,selection_method,PACS,VLCS,OfficeHome,TerraIncognita,DomainNet,Avg,source\n"
        "ERM,ResNet-50,training-domain validation,about 85,,,,,,paper\n"
    )
    with pytest.raises(ValueError, match="PACS"):
        report.load_reference_results(bad_csv)
