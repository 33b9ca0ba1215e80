"""Tests of jps_domainbed.domainbed_patch and of the hooks that the diffs add.

The tests that need DomainBed extract the pinned commit from
$JPS_DOMAINBED_SOURCE or the per-user cache archive (see
jps_domainbed.install_domainbed) and skip, with the places they looked, when
neither exists. `make domainbed` writes the cache archive.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jps_domainbed import domainbed_patch, install_domainbed
from jps_domainbed.domainbed_patch import (CHECK_APPLIED, CHECK_NOT_APPLIED, CHECK_OTHER,
                                           PATCHES, PatchError, DomainBedVersionError)

TARGET_FILES = [path for spec in PATCHES.values() for path in spec.files]
DATASETS_TO_COMPARE = ["RotatedMNIST", "ColoredMNIST", "VLCS", "DomainNet", "TerraIncognita"]
SEEDS_TO_COMPARE = [0, 1, 12345]


# ---------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def tree_copy(pristine_tree, tmp_path):
    """A writable copy of the pristine tree."""
    destination = tmp_path / "DomainBed"
    shutil.copytree(pristine_tree, destination)
    return destination


def read_target_files(root):
    return {path: (Path(root) / path).read_bytes() for path in TARGET_FILES}


def read_all_files(root):
    root = Path(root)
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def run_python(code, pythonpath, cwd, *args):
    """Run `code` in a fresh interpreter with `pythonpath` first on sys.path."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(str(path) for path in pythonpath)
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------------------
# The diffs themselves (no DomainBed needed)


def test_plugins_patch_touches_only_its_files():
    diffs = domainbed_patch.load_patch(PATCHES["plugins"])

    assert sorted(diffs) == ["domainbed/algorithms.py", "domainbed/hparams_registry.py"]


def test_launchers_patch_touches_only_its_file():
    diffs = domainbed_patch.load_patch(PATCHES["launchers"])

    assert sorted(diffs) == ["domainbed/command_launchers.py"]


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patch_names_no_plugin_package(name):
    text = (domainbed_patch.default_patch_dir() / PATCHES[name].filename).read_text()

    assert "jps" not in text.lower()


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_every_hunk_starts_with_comment(name):
    diffs = domainbed_patch.load_patch(PATCHES[name])
    for file_diff in diffs.values():
        for hunk in file_diff.hunks:
            added = [text for tag, text in hunk.lines if tag == "+"]
            first_code = next(text for text in added if text.strip())
            assert first_code.lstrip().startswith("#"), (file_diff.relative_path, first_code)


# ---------------------------------------------------------------------------
# The diff parser (no DomainBed needed)

SAMPLE_DIFF = """\
--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -1,3 +1,4 @@
 one
-two
+TWO
+two and a half
 three
@@ -5,0 +7,1 @@
+six
"""

SAMPLE_TEXT = "one\ntwo\nthree\nfour\nfive\n"
SAMPLE_RESULT = "one\nTWO\ntwo and a half\nthree\nfour\nfive\nsix\n"


def test_parse_unified_diff_paths_and_hunks():
    (file_diff,) = domainbed_patch.parse_unified_diff(SAMPLE_DIFF)

    assert file_diff.relative_path == "pkg/mod.py"
    assert len(file_diff.hunks) == 2
    assert file_diff.hunks[1].old_length == 0


def test_apply_file_diff_forward():
    (file_diff,) = domainbed_patch.parse_unified_diff(SAMPLE_DIFF)

    assert domainbed_patch.apply_file_diff(SAMPLE_TEXT, file_diff) == SAMPLE_RESULT


def test_apply_file_diff_reverse():
    (file_diff,) = domainbed_patch.parse_unified_diff(SAMPLE_DIFF)

    assert domainbed_patch.apply_file_diff(SAMPLE_RESULT, file_diff, reverse=True) == SAMPLE_TEXT


def test_apply_file_diff_context_mismatch():
    (file_diff,) = domainbed_patch.parse_unified_diff(SAMPLE_DIFF)

    with pytest.raises(PatchError, match="expected 'two\\\\n', found 'deux\\\\n'"):
        domainbed_patch.apply_file_diff("one\ndeux\nthree\nfour\nfive\n", file_diff)


def test_no_newline_at_end_marker():
    diff = ("--- a/f\n+++ b/f\n@@ -1 +1 @@\n-old\n\\ No newline at end of file\n"
            "+new\n\\ No newline at end of file\n")
    (file_diff,) = domainbed_patch.parse_unified_diff(diff)

    assert domainbed_patch.apply_file_diff("old", file_diff) == "new"


def test_parse_rejects_file_creation():
    diff = "--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+x\n"

    with pytest.raises(PatchError, match="only in-place changes"):
        domainbed_patch.parse_unified_diff(diff)


def test_parse_rejects_truncated_hunk():
    diff = "--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n one\n"

    with pytest.raises(PatchError, match="truncated"):
        domainbed_patch.parse_unified_diff(diff)


def test_unknown_patch_name(tmp_path):
    with pytest.raises(PatchError, match="Unknown patch 'typo'"):
        domainbed_patch.inspect_tree(tmp_path, ["typo"])


def test_folder_without_domainbed(tmp_path, capsys):
    code = domainbed_patch.main(["apply", str(tmp_path)])

    assert code == CHECK_OTHER
    assert "does not contain a domainbed/ package folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Applying to a pinned tree


@pytest.mark.domainbed
def test_check_pristine_tree_not_applied(tree_copy, capsys):
    code = domainbed_patch.main(["check", str(tree_copy)])

    assert code == CHECK_NOT_APPLIED
    assert "not applied" in capsys.readouterr().out


@pytest.mark.domainbed
def test_apply_patches_pristine_tree(tree_copy):
    results = domainbed_patch.apply_patches(tree_copy)

    assert all(changed for _, changed in results)
    for spec in PATCHES.values():
        for path, (_, patched_hash) in spec.files.items():
            assert sha256((tree_copy / path).read_bytes()) == patched_hash, path
    assert domainbed_patch.check_patches(tree_copy)[0] == CHECK_APPLIED


@pytest.mark.domainbed
def test_cli_apply_then_check(tree_copy, capsys):
    assert domainbed_patch.main(["apply", str(tree_copy)]) == 0
    assert domainbed_patch.main(["check", str(tree_copy)]) == CHECK_APPLIED
    assert "are applied" in capsys.readouterr().out


@pytest.mark.domainbed
def test_apply_twice_is_noop(tree_copy, capsys):
    domainbed_patch.apply_patches(tree_copy)
    after_first = read_all_files(tree_copy)

    assert domainbed_patch.main(["apply", str(tree_copy)]) == 0

    assert "Nothing to do" in capsys.readouterr().out
    assert read_all_files(tree_copy) == after_first


@pytest.mark.domainbed
def test_revert_restores_pristine_bytes(tree_copy, pristine_tree):
    domainbed_patch.apply_patches(tree_copy)

    assert domainbed_patch.main(["revert", str(tree_copy)]) == 0

    assert read_all_files(tree_copy) == read_all_files(pristine_tree)


@pytest.mark.domainbed
def test_select_one_patch(tree_copy):
    domainbed_patch.apply_patches(tree_copy, ["launchers"])

    assert domainbed_patch.check_patches(tree_copy, ["launchers"])[0] == CHECK_APPLIED
    assert domainbed_patch.check_patches(tree_copy, ["plugins"])[0] == CHECK_NOT_APPLIED
    code, message = domainbed_patch.check_patches(tree_copy)
    assert code == CHECK_NOT_APPLIED
    assert "partially applied" in message


@pytest.mark.domainbed
def test_apply_completes_partial_state(tree_copy):
    domainbed_patch.apply_patches(tree_copy)
    domainbed_patch.revert_patches(tree_copy, ["plugins"])

    domainbed_patch.apply_patches(tree_copy)

    assert domainbed_patch.check_patches(tree_copy)[0] == CHECK_APPLIED


@pytest.mark.domainbed
def test_other_version_rejected(tree_copy, capsys):
    edited = tree_copy / "domainbed" / "hparams_registry.py"
    lines = edited.read_text().splitlines(keepends=True)
    lines[1] = "import numpy as np  # edited\n"
    edited.write_text("".join(lines))
    before = read_target_files(tree_copy)

    code = domainbed_patch.main(["apply", str(tree_copy)])

    error = capsys.readouterr().err
    assert code == CHECK_OTHER
    assert str(edited) in error
    assert sha256(edited.read_bytes()) in error
    assert domainbed_patch.DOMAINBED_COMMIT in error
    assert "Nothing was written" in error
    assert read_target_files(tree_copy) == before
    assert domainbed_patch.check_patches(tree_copy)[0] == CHECK_OTHER


@pytest.mark.domainbed
def test_missing_file_rejected(tree_copy):
    (tree_copy / "domainbed" / "command_launchers.py").unlink()
    before = read_target_files_present(tree_copy)

    with pytest.raises(DomainBedVersionError, match="command_launchers.py: missing"):
        domainbed_patch.apply_patches(tree_copy)

    assert read_target_files_present(tree_copy) == before


def read_target_files_present(root):
    return {path: (Path(root) / path).read_bytes()
            for path in TARGET_FILES if (Path(root) / path).is_file()}


@pytest.mark.domainbed
def test_inconsistent_hashes_write_nothing(tree_copy, monkeypatch):
    spec = PATCHES["plugins"]
    wrong_files = dict(spec.files)
    pristine_hash, _ = wrong_files["domainbed/hparams_registry.py"]
    wrong_files["domainbed/hparams_registry.py"] = (pristine_hash, "0" * 64)
    monkeypatch.setitem(PATCHES, "plugins", domainbed_patch.PatchSpec(
        spec.name, spec.filename, wrong_files))
    before = read_target_files(tree_copy)

    with pytest.raises(PatchError, match="disagree"):
        domainbed_patch.apply_patches(tree_copy)

    assert read_target_files(tree_copy) == before


# ---------------------------------------------------------------------------
# The patched DomainBed in a fresh interpreter

HPARAMS_SCRIPT = """
import json, sys
from domainbed import algorithms, hparams_registry
import domainbed

def plain(value):
    return value.item() if hasattr(value, "item") else value

algorithm_names, datasets, seeds = json.loads(sys.argv[1])
result = {"file": domainbed.__file__, "ALGORITHMS": algorithms.ALGORITHMS, "hparams": {}}
for algorithm in algorithm_names:
    for dataset in datasets:
        entry = {"default": hparams_registry.default_hparams(algorithm, dataset)}
        for seed in seeds:
            entry[str(seed)] = hparams_registry.random_hparams(algorithm, dataset, seed)
        result["hparams"][algorithm + "/" + dataset] = entry
print(json.dumps(result, sort_keys=True, default=plain))
"""


def entry_point_names(group):
    try:
        found = importlib.metadata.entry_points(group=group)
    except TypeError:  # Python 3.9
        found = importlib.metadata.entry_points().get(group, [])
    names = []
    for entry_point in found:
        if entry_point.name not in names:
            names.append(entry_point.name)
    return names


def domainbed_report(tree, algorithm_names, cwd):
    arguments = json.dumps([algorithm_names, DATASETS_TO_COMPARE, SEEDS_TO_COMPARE])
    output = run_python(HPARAMS_SCRIPT, [tree], cwd, arguments)
    report = json.loads(output)
    assert Path(report["file"]).resolve().is_relative_to(Path(tree).resolve())
    return report


@pytest.mark.domainbed
@pytest.mark.slow
def test_patched_hparams_match_pristine(pristine_tree, tree_copy, tmp_path):
    domainbed_patch.apply_patches(tree_copy)
    pristine = domainbed_report(pristine_tree, [], tmp_path)
    stock_algorithms = pristine["ALGORITHMS"]

    pristine = domainbed_report(pristine_tree, stock_algorithms, tmp_path)
    patched = domainbed_report(tree_copy, stock_algorithms, tmp_path)

    assert len(pristine["hparams"]) == len(stock_algorithms) * len(DATASETS_TO_COMPARE)
    assert patched["hparams"] == pristine["hparams"]
    plugin_names = [name for name in entry_point_names("domainbed.algorithms")
                    if name not in stock_algorithms]
    assert patched["ALGORITHMS"] == stock_algorithms + plugin_names


FAKE_PLUGIN_MODULE = '''
from domainbed.algorithms import ERM


class FakeAlgorithm(ERM):
    pass


class NotAnAlgorithm:
    pass


def fake_hparams(algorithm, dataset):
    return {
        "lr": (0.123, lambda r: r.uniform(0.0, 1.0)),
        "fake_width": (8, lambda r: int(r.choice([4, 8, 16]))),
    }


def fake_launcher(commands):
    print("fake launcher got", len(commands), "commands")


def local_launcher_override(commands):
    raise AssertionError("a plugin must not replace the local launcher")
'''

FAKE_ENTRY_POINTS = """
[domainbed.algorithms]
FakeAlgorithm = fakeplugin:FakeAlgorithm
BrokenAlgorithm = fakeplugin_missing:Broken
NotAnAlgorithm = fakeplugin:NotAnAlgorithm
ERM = fakeplugin:FakeAlgorithm

[domainbed.hparams]
FakeAlgorithm = fakeplugin:fake_hparams

[domainbed.command_launchers]
fake = fakeplugin:fake_launcher
local = fakeplugin:local_launcher_override
"""

FAKE_PLUGIN_SCRIPT = """
import json
import numpy as np
from domainbed import algorithms, command_launchers, hparams_registry
from domainbed.lib import misc

result = {"ALGORITHMS": algorithms.ALGORITHMS}
result["fake_class"] = algorithms.get_algorithm_class("FakeAlgorithm").__name__
result["erm_module"] = algorithms.get_algorithm_class("ERM").__module__
for name in ("BrokenAlgorithm", "NotAnAlgorithm"):
    try:
        algorithms.get_algorithm_class(name)
        result[name] = "no error"
    except Exception as error:
        result[name] = type(error).__name__ + ": " + str(error)

default = hparams_registry.default_hparams("FakeAlgorithm", "RotatedMNIST")
random = hparams_registry.random_hparams("FakeAlgorithm", "RotatedMNIST", 3)
erm_default = hparams_registry.default_hparams("ERM", "RotatedMNIST")
result["default_lr"] = default["lr"]
result["default_fake_width"] = default["fake_width"]
result["random_lr"] = float(random["lr"])
result["expected_random_lr"] = float(
    np.random.RandomState(misc.seed_hash(3, "lr")).uniform(0.0, 1.0))
result["same_keys_as_erm_plus_one"] = sorted(default) == sorted(list(erm_default) + ["fake_width"])
result["erm_lr"] = erm_default["lr"]

command_launchers.REGISTRY["fake"](["a", "b"])
result["local_is_stock"] = command_launchers.REGISTRY["local"] is command_launchers.local_launcher
print(json.dumps(result))
"""


@pytest.mark.domainbed
@pytest.mark.slow
def test_hooks_with_fake_plugin(tree_copy, tmp_path):
    domainbed_patch.apply_patches(tree_copy)
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "fakeplugin.py").write_text(FAKE_PLUGIN_MODULE)
    dist_info = plugin_dir / "fakeplugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(FAKE_ENTRY_POINTS)

    output = run_python(FAKE_PLUGIN_SCRIPT, [tree_copy, plugin_dir], tmp_path)
    *printed, last_line = output.strip().splitlines()
    result = json.loads(last_line)

    assert printed == ["fake launcher got 2 commands"]
    assert result["ALGORITHMS"].count("ERM") == 1
    assert "FakeAlgorithm" in result["ALGORITHMS"]
    assert "BrokenAlgorithm" in result["ALGORITHMS"]
    assert result["fake_class"] == "FakeAlgorithm"
    assert result["erm_module"] == "domainbed.algorithms"
    assert result["BrokenAlgorithm"].startswith("ImportError: Failed to load algorithm plugin")
    assert "BrokenAlgorithm = fakeplugin_missing:Broken" in result["BrokenAlgorithm"]
    assert "No module named 'fakeplugin_missing'" in result["BrokenAlgorithm"]
    assert result["NotAnAlgorithm"].startswith("TypeError:")
    assert "expected a subclass of domainbed.algorithms.Algorithm" in result["NotAnAlgorithm"]
    assert result["default_lr"] == 0.123
    assert result["default_fake_width"] == 8
    assert result["random_lr"] == result["expected_random_lr"]
    assert result["same_keys_as_erm_plus_one"]
    assert result["erm_lr"] == 1e-3
    assert result["local_is_stock"]
