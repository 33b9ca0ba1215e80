"""`python -m jps_domainbed.inspect_mask` on real and hand-built model.pkl files."""

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from domainbed_support import requires_domainbed, run_module  # noqa: E402
from jps_domainbed import inspect_mask  # noqa: E402
from jps_domainbed.mask import SparseMask  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_HPARAMS = {
    "clip_model": "jps-vit-tiny", "clip_pretrained": "none", "clip_image_size": 32,
    "head_init": "random", "batch_size": 8,
    "jps_k": 100, "jps_rho": 0.2, "jps_selection_batches": 2,
}
# A row of the per-block table: block, weight, shape, selected, share, units, max per unit.
BLOCK_ROW = re.compile(
    r"^\s*(\d+)\s+(\S+)\s+(\d+)x(\d+)\s+(\d+)\s+[\d.]+%\s+(\d+)/(\d+)\s+(\d+)$")
TOP_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(\d+)$")


# --------------------------------------------------------------------------
# Helpers


def write_png_check(path):
    """Assert that ``path`` is a PNG that matplotlib reads back as an image."""
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100


def parse_block_rows(stdout):
    """Return {block: (selected, units with selection, units, max per unit)} from the table."""
    rows = {}
    for line in stdout.splitlines():
        match = BLOCK_ROW.match(line)
        if match:
            block = int(match.group(1))
            assert block not in rows, f"block {block} listed twice:\n{stdout}"
            rows[block] = (int(match.group(5)), int(match.group(6)), int(match.group(7)),
                           int(match.group(8)))
    return rows


def parse_top_rows(stdout):
    """Return [(block, unit, count)] from the top-units table."""
    section = stdout.split("units by selected weights", 1)[1]
    return [(int(m.group(2)), int(m.group(4)), int(m.group(5)))
            for m in map(TOP_ROW.match, section.splitlines()) if m]


def block_of(name):
    return int(re.search(r"resblocks\.(\d+)\.", name).group(1))


def run_cli(*args):
    """Run the command in a fresh process and return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "jps_domainbed.inspect_mask", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def mask_state(indices, shapes, **metadata):
    return {"format_version": 1, "indices": indices, "shapes": shapes, "metadata": metadata}


def jps_model_pkl(mask, algorithm="JPS", steps=7, **model_dict):
    """A model.pkl dict in DomainBed's layout around a hand-built JPS checkpoint."""
    checkpoint = {
        "format": inspect_mask.CHECKPOINT_FORMAT,
        "algorithm": algorithm,
        "clip": {"model_name": "test-vit", "pretrained": "none", "image_size": 32},
        "encoder_hash": "0" * 64,
        "head": {},
        "encoder": None,
        "mask": mask,
        "selected_values": None,
    }
    checkpoint.update(model_dict)
    return {
        "args": {"dataset": "RotatedMNIST", "algorithm": algorithm, "test_envs": [0],
                 "steps": steps},
        "model_input_shape": (1, 28, 28),
        "model_num_classes": 10,
        "model_num_domains": 5,
        "model_hparams": {"jps_k": 5, "jps_selection_batches": 2},
        "model_dict": checkpoint,
    }


def synthetic_mask():
    """Three 8x4 c_fc weights in blocks 10, 0 and 2 (given out of order) with 5 entries."""
    shape = [8, 4]
    return mask_state(
        indices={
            "visual.transformer.resblocks.10.mlp.c_fc.weight": torch.tensor([31]),
            "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.tensor([0, 1, 2, 9]),
            "visual.transformer.resblocks.2.mlp.c_fc.weight": torch.tensor([], dtype=torch.int64),
        },
        shapes={
            "visual.transformer.resblocks.10.mlp.c_fc.weight": shape,
            "visual.transformer.resblocks.0.mlp.c_fc.weight": shape,
            "visual.transformer.resblocks.2.mlp.c_fc.weight": shape,
        },
        k=5, rho=0.25, candidate_patterns=["*.mlp.c_fc.weight"], survivor_counts=[12, 7])


def assert_invalid_input(argv, caplog, expected_parts, folder):
    """Run main(argv) and assert exit code 2, one error with every part, and no new file."""
    before = sorted(folder.rglob("*"))
    with caplog.at_level(logging.INFO, logger=inspect_mask.__name__):
        code = inspect_mask.main([str(arg) for arg in argv])
    assert code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    for part in expected_parts:
        assert part in errors[0]
    assert sorted(folder.rglob("*")) == before, "a file was written for invalid input"


# --------------------------------------------------------------------------
# Hand-built checkpoints (no DomainBed needed)


def test_synthetic_checkpoint_table(tmp_path, capsys):
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(synthetic_mask()), path)

    assert inspect_mask.main([str(path), "--top", "3"]) == 0

    expected = f"""\
JPS mask in {path}
Encoder: test-vit (pretrained: none), candidate weights: *.mlp.c_fc.weight
Training: dataset RotatedMNIST, test envs [0], 7 steps
Selected: 5 of 96 candidate weights (5.208%), k = 5, rho = 0.25
Importance-operator survivors, intersected over the first 1, 2, ... source domains: 12, 7

Selected weights per transformer block
A unit is one row of the weight, that is one output feature of its layer. In mlp.c_fc.weight, a row is one MLP hidden unit.
block  weight           shape  selected   share  units with selection  max per unit
    0  mlp.c_fc.weight  8x4           4   80.0%                   2/8             3
    2  mlp.c_fc.weight  8x4           0    0.0%                   0/8             0
   10  mlp.c_fc.weight  8x4           1   20.0%                   1/8             1
total                                 5  100.0%                  3/24             3

Top 3 units by selected weights
rank  block  weight           unit  selected
   1      0  mlp.c_fc.weight     0         3
   2      0  mlp.c_fc.weight     2         1
   3     10  mlp.c_fc.weight     7         1
"""
    assert capsys.readouterr().out == expected
    write_png_check(tmp_path / "mask_per_block.png")


def test_synthetic_top_zero_and_short_list(tmp_path, capsys):
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(synthetic_mask()), path)

    assert inspect_mask.main([str(path), "--top", "0"]) == 0
    assert "units by selected weights" not in capsys.readouterr().out

    # Only three units hold a selected entry, so a request for 50 lists three.
    assert inspect_mask.main([str(path), "--top", "50"]) == 0
    out = capsys.readouterr().out
    assert "Top 3 units by selected weights (of 50 requested)" in out
    assert parse_top_rows(out) == [(0, 0, 3), (0, 2, 1), (10, 7, 1)]


def test_custom_patterns_summary():
    # The c_proj weight has 4 rows (output units), and visual.proj is outside every block.
    mask = SparseMask.from_state_dict(mask_state(
        indices={
            "visual.proj": torch.tensor([5]),
            "visual.transformer.resblocks.1.mlp.c_proj.weight": torch.tensor([0, 8, 9, 31]),
            "visual.transformer.resblocks.1.mlp.c_fc.weight": torch.tensor([4]),
            "visual.transformer.resblocks.0.ln_1.bias": torch.tensor([2, 3]),
        },
        shapes={
            "visual.proj": [4, 2],
            "visual.transformer.resblocks.1.mlp.c_proj.weight": [4, 8],
            "visual.transformer.resblocks.1.mlp.c_fc.weight": [8, 4],
            "visual.transformer.resblocks.0.ln_1.bias": [4],
        }))

    summaries = inspect_mask.summarize_mask(mask)

    assert [(s.block, s.kind) for s in summaries] == [
        (0, "ln_1.bias"), (1, "mlp.c_fc.weight"), (1, "mlp.c_proj.weight"),
        (None, "visual.proj")]
    assert summaries[0].unit_counts.tolist() == [0, 0, 1, 1]
    assert summaries[1].unit_counts.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert summaries[2].unit_counts.tolist() == [1, 2, 0, 1]
    assert summaries[3].unit_counts.tolist() == [0, 0, 1, 0]

    table = "\n".join(inspect_mask.block_table_lines(summaries))
    assert re.search(r"^\s*1\s+\(block total\)\s+5\s+62\.5%$", table, re.MULTILINE), table
    assert re.search(r"^\s*-\s+visual\.proj\s+4x2\s+1\s+12\.5%\s+1/4\s+1$", table,
                     re.MULTILINE), table
    assert re.search(r"^total\s+8\s+100\.0%\s+7/20\s+2$", table, re.MULTILINE), table

    assert inspect_mask.top_units(summaries, 2) == [
        inspect_mask.UnitCount(1, "mlp.c_proj.weight", 1, 2),
        inspect_mask.UnitCount(0, "ln_1.bias", 2, 1)]


def test_custom_patterns_plot(tmp_path):
    mask = SparseMask.from_state_dict(mask_state(
        indices={"visual.transformer.resblocks.0.mlp.c_proj.weight": torch.tensor([1]),
                 "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.tensor([2, 3]),
                 "visual.proj": torch.tensor([0])},
        shapes={"visual.transformer.resblocks.0.mlp.c_proj.weight": [4, 8],
                "visual.transformer.resblocks.0.mlp.c_fc.weight": [8, 4],
                "visual.proj": [4, 2]},
        k=4))
    path = tmp_path / "plot.png"

    inspect_mask.plot_counts(inspect_mask.summarize_mask(mask), path, "title")

    write_png_check(path)


def test_fewer_selected_than_k_warns(tmp_path, caplog, capsys):
    mask = synthetic_mask()
    mask["metadata"]["k"] = 9
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(mask), path)

    with caplog.at_level(logging.WARNING, logger=inspect_mask.__name__):
        assert inspect_mask.main([str(path)]) == 0

    assert "the mask selects 5 weights but k = 9" in caplog.text
    assert "k = 9" in capsys.readouterr().out


def test_full_pickle_fallback_warns(tmp_path, caplog, capsys):
    # argparse.Namespace is outside torch's weights_only allowlist.
    saved = jps_model_pkl(synthetic_mask())
    saved["args"] = argparse.Namespace(**saved["args"])
    path = tmp_path / "model.pkl"
    torch.save(saved, path)

    with caplog.at_level(logging.WARNING, logger=inspect_mask.__name__):
        assert inspect_mask.main([str(path)]) == 0

    assert "could not be loaded with weights_only=True" in caplog.text
    assert "argparse.Namespace" in caplog.text
    assert "Training: dataset RotatedMNIST, test envs [0], 7 steps" in capsys.readouterr().out


def test_missing_file_rejected(tmp_path, caplog):
    missing = tmp_path / "job" / "model.pkl"
    assert_invalid_input([missing], caplog, ["model.pkl not found", str(missing), "--output_dir"],
                         tmp_path)


def test_directory_as_model_pkl_rejected(tmp_path, caplog):
    assert_invalid_input([tmp_path], caplog, [f"{tmp_path} is a directory",
                                              str(tmp_path / "model.pkl")], tmp_path)


def test_not_torch_file_rejected(tmp_path, caplog):
    path = tmp_path / "model.pkl"
    path.write_text("not a checkpoint\n")
    assert_invalid_input([path], caplog, [f"{path} could not be read by torch.load",
                                          "domainbed.scripts.train"], tmp_path)


@pytest.mark.parametrize("content", [{"state_dict": {}}, torch.zeros(3)], ids=["dict", "tensor"])
def test_not_domainbed_pkl_rejected(tmp_path, caplog, content):
    path = tmp_path / "model.pkl"
    torch.save(content, path)
    assert_invalid_input([path], caplog, [f"{path} is not a DomainBed model.pkl",
                                          "'model_dict'", "--output_dir"], tmp_path)


def test_plugin_algorithm_rejected(tmp_path, caplog):
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(None, algorithm="CLIP_ERM"), path)
    assert_invalid_input([path], caplog, ["written by algorithm CLIP_ERM, not JPS",
                                          "--algorithm JPS"], tmp_path)


def test_other_checkpoint_format_rejected(tmp_path, caplog):
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(synthetic_mask(), format="jps-domainbed-checkpoint/9"), path)
    assert_invalid_input([path], caplog, ["'jps-domainbed-checkpoint/9'",
                                          repr(inspect_mask.CHECKPOINT_FORMAT)], tmp_path)


def test_invalid_mask_rejected(tmp_path, caplog):
    mask = synthetic_mask()
    mask["indices"]["visual.transformer.resblocks.0.mlp.c_fc.weight"] = torch.tensor([0, 32])
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(mask), path)
    assert_invalid_input([path], caplog, [f"the JPS mask in {path} is invalid",
                                          "fall outside its 32 entries"], tmp_path)


def test_output_folder_missing_rejected(tmp_path, caplog):
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(synthetic_mask()), path)
    output = tmp_path / "plots" / "mask.png"
    assert_invalid_input([path, "--output", output], caplog,
                         [f"the folder {output.parent}", "does not exist", "Create it"], tmp_path)


def test_output_not_png_rejected(tmp_path, caplog):
    path = tmp_path / "model.pkl"
    torch.save(jps_model_pkl(synthetic_mask()), path)
    output = tmp_path / "mask.pdf"
    assert_invalid_input([path, "--output", output], caplog,
                         [f"--output {output} does not end in .png", str(tmp_path / "mask.png")],
                         tmp_path)


def test_negative_top_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect_mask.main([str(tmp_path / "model.pkl"), "--top", "-1"])
    assert exit_info.value.code == 2
    assert "must be 0 or more, got -1" in capsys.readouterr().err


def test_cli_exit_code_for_invalid_input(tmp_path):
    missing = tmp_path / "model.pkl"

    result = run_cli(missing)

    assert result.returncode == 2, result.stderr
    assert f"model.pkl not found: {missing}" in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# A real model.pkl from DomainBed's train.py


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory):
    """Output folder of a 5-step JPS run on RotatedMNIST with the tiny encoder."""
    data_dir = tmp_path_factory.mktemp("data")
    run_module("jps_domainbed.mnist_data", "--data_dir", data_dir)
    output_dir = tmp_path_factory.mktemp("job")
    run_module("domainbed.scripts.train", "--data_dir", data_dir, "--dataset", "RotatedMNIST",
               "--algorithm", "JPS", "--test_envs", "0", "--steps", "5",
               "--output_dir", output_dir, "--hparams", json.dumps(TRAIN_HPARAMS))
    return output_dir


@pytest.fixture
def model_pkl(trained_job, tmp_path):
    """A copy of the trained model.pkl in a fresh folder, so outputs do not collide."""
    path = tmp_path / "model.pkl"
    shutil.copyfile(trained_job / "model.pkl", path)
    return path


@requires_domainbed
@pytest.mark.domainbed
def test_checkpoint_format_matches_algorithms():
    from jps_domainbed import algorithms

    assert inspect_mask.CHECKPOINT_FORMAT == algorithms.CHECKPOINT_FORMAT


@requires_domainbed
@pytest.mark.domainbed
def test_real_pkl_counts_match_mask(model_pkl):
    result = run_module("jps_domainbed.inspect_mask", model_pkl, "--top", "5")

    # Counts computed here straight from the saved indices, without SparseMask.
    mask = torch.load(model_pkl, map_location="cpu", weights_only=False)["model_dict"]["mask"]
    expected = {}
    unit_totals = []
    for name, index in mask["indices"].items():
        rows, columns = mask["shapes"][name]
        per_unit = torch.bincount(index // columns, minlength=rows)
        expected[block_of(name)] = (index.numel(), int((per_unit > 0).sum()), rows,
                                    int(per_unit.max()))
        unit_totals += [(block_of(name), unit, int(count))
                        for unit, count in enumerate(per_unit.tolist()) if count]

    printed = parse_block_rows(result.stdout)
    assert printed == expected, result.stdout
    assert sum(selected for selected, *_ in printed.values()) == TRAIN_HPARAMS["jps_k"]
    assert mask["metadata"]["k"] == TRAIN_HPARAMS["jps_k"]
    assert "Selected: 100 of 32768 candidate weights" in result.stdout
    assert "k = 100, rho = 0.2" in result.stdout
    assert "Encoder: jps-vit-tiny (pretrained: none)" in result.stdout

    top = parse_top_rows(result.stdout)
    assert len(top) == 5
    assert [count for _, _, count in top] == sorted((c for _, _, c in unit_totals), reverse=True)[:5]
    assert set(top) <= set(unit_totals)


@requires_domainbed
@pytest.mark.domainbed
def test_real_pkl_writes_default_png(model_pkl):
    run_module("jps_domainbed.inspect_mask", model_pkl)

    write_png_check(model_pkl.parent / "mask_per_block.png")


@requires_domainbed
@pytest.mark.domainbed
def test_real_pkl_writes_output_png(model_pkl, tmp_path):
    output = tmp_path / "plots" / "mask.png"
    output.parent.mkdir()

    result = run_module("jps_domainbed.inspect_mask", model_pkl, "--output", output)

    write_png_check(output)
    assert not (model_pkl.parent / "mask_per_block.png").exists()
    assert f"wrote {output}" in result.stderr


@requires_domainbed
@pytest.mark.domainbed
def test_real_pkl_without_mask_rejected(model_pkl, caplog):
    # What train.py saves when it stops before jps_selection_batches (2) steps.
    saved = torch.load(model_pkl, map_location="cpu", weights_only=False)
    saved["args"]["steps"] = 1
    saved["model_dict"]["mask"] = None
    saved["model_dict"]["selected_values"] = None
    torch.save(saved, model_pkl)

    assert_invalid_input([model_pkl], caplog, [
        f"{model_pkl} contains a JPS checkpoint without a mask", "after 1 step(s)",
        "jps_selection_batches=2", "Train with --steps 2 or more"], model_pkl.parent)


@requires_domainbed
@pytest.mark.domainbed
def test_erm_pkl_rejected(model_pkl, caplog):
    # DomainBed's own ERM, saved with the fields train.py's save_checkpoint writes.
    from domainbed import algorithms, hparams_registry

    saved = torch.load(model_pkl, map_location="cpu", weights_only=False)
    hparams = hparams_registry.default_hparams("ERM", "RotatedMNIST")
    erm = algorithms.ERM(saved["model_input_shape"], saved["model_num_classes"],
                         saved["model_num_domains"], hparams)
    saved.update(args=dict(saved["args"], algorithm="ERM"), model_hparams=hparams,
                 model_dict=erm.state_dict())
    torch.save(saved, model_pkl)

    assert_invalid_input([model_pkl], caplog, [
        f"{model_pkl} was written by algorithm ERM, not JPS", "--algorithm JPS"],
        model_pkl.parent)


@requires_domainbed
@pytest.mark.domainbed
def test_real_pkl_output_folder_missing(model_pkl):
    output = model_pkl.parent / "missing" / "mask.png"

    result = run_cli(model_pkl, "--output", output)

    assert result.returncode == 2, result.stderr
    assert f"the folder {output.parent} of --output {output} does not exist" in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in model_pkl.parent.iterdir()) == ["model.pkl"]
