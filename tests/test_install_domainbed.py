"""Tests of jps_domainbed.install_domainbed.

Every test installs into tmp_path, writes its .pth file into a folder under
tmp_path (--site-packages) and points XDG_CACHE_HOME at tmp_path, so neither
the environment nor the real per-user cache changes. Nothing contacts another
host: the download path is tested with a closed port on 127.0.0.1.
"""

import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from jps_domainbed import domainbed_patch, install_domainbed
from jps_domainbed.domainbed_patch import DOMAINBED_COMMIT, PATCHES
from jps_domainbed.install_domainbed import ARCHIVE_TOP_FOLDER, PTH_FILENAME


@pytest.fixture(scope="session")
def pristine_archive(pristine_tree, tmp_path_factory):
    """A .tar.gz laid out like GitHub's archive: DomainBed-<commit>/domainbed/..."""
    archive_path = tmp_path_factory.mktemp("archive") / "DomainBed.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(pristine_tree, arcname=ARCHIVE_TOP_FOLDER)
    return archive_path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Paths for one install, with the cache and the source variable isolated."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(install_domainbed.SOURCE_ENV_VAR, raising=False)
    paths = {
        "prefix": tmp_path / "prefix",
        "site": tmp_path / "site",
        "cache": tmp_path / "cache" / "jps-domainbed" / (ARCHIVE_TOP_FOLDER + ".tar.gz"),
    }
    return paths


def install_args(paths, *extra):
    return ["--prefix", str(paths["prefix"]), "--site-packages", str(paths["site"]),
            "--no-deps", *extra]


def closed_local_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hashes_in_archive(archive_path):
    """Return {relative path: SHA-256} of the patch target files in an archive."""
    result = {}
    with tarfile.open(archive_path) as archive:
        for spec in PATCHES.values():
            for relative_path in spec.files:
                member = archive.extractfile("{}/{}".format(ARCHIVE_TOP_FOLDER, relative_path))
                result[relative_path] = hashlib.sha256(member.read()).hexdigest()
    return result


PRISTINE_HASHES = {path: hashes[0] for spec in PATCHES.values()
                   for path, hashes in spec.files.items()}


# ---------------------------------------------------------------------------
# Bad inputs (no DomainBed needed)


def test_cache_path_uses_xdg_cache_home(tmp_path):
    path = install_domainbed.cache_archive_path({"XDG_CACHE_HOME": str(tmp_path)})

    assert path == tmp_path / "jps-domainbed" / "DomainBed-{}.tar.gz".format(DOMAINBED_COMMIT)


def test_cache_path_default_home():
    path = install_domainbed.cache_archive_path({})

    assert path == Path.home() / ".cache" / "jps-domainbed" / (ARCHIVE_TOP_FOLDER + ".tar.gz")


def test_bogus_source_names_path(isolated, capsys):
    bogus = "/nonexistent/DomainBed-source"

    code = install_domainbed.main(install_args(isolated, "--source", bogus))

    error = capsys.readouterr().err
    assert code == 1
    assert "{} (from --source) not found".format(bogus) in error
    assert not (isolated["prefix"] / "DomainBed").exists()


def test_bogus_env_source_names_variable(isolated, monkeypatch, capsys):
    monkeypatch.setenv(install_domainbed.SOURCE_ENV_VAR, "/nonexistent/from-env")

    code = install_domainbed.main(install_args(isolated))

    assert code == 1
    assert "/nonexistent/from-env (from JPS_DOMAINBED_SOURCE) not found" in capsys.readouterr().err


def test_no_network_lists_lookups(isolated, capsys):
    code = install_domainbed.main(install_args(isolated, "--no-network"))

    error = capsys.readouterr().err
    assert code == 1
    assert "JPS_DOMAINBED_SOURCE: not set" in error
    assert "cache archive {}: not found".format(isolated["cache"]) in error
    assert "skipped (--no-network)" in error
    assert "Pass --source PATH_OR_URL" in error


def test_download_failure_lists_lookups(isolated, monkeypatch, capsys):
    url = "http://127.0.0.1:{}/DomainBed.tar.gz".format(closed_local_port())
    monkeypatch.setattr(install_domainbed, "DOWNLOAD_URL", url)

    code = install_domainbed.main(install_args(isolated))

    error = capsys.readouterr().err
    assert code == 1
    assert "download {}: failed".format(url) in error
    assert "cache archive {}: not found".format(isolated["cache"]) in error
    assert not isolated["cache"].exists()


def test_source_url_failure(isolated, capsys):
    url = "http://127.0.0.1:{}/DomainBed.tar.gz".format(closed_local_port())

    code = install_domainbed.main(install_args(isolated, "--source", url))

    assert code == 1
    assert "Download of {} failed".format(url) in capsys.readouterr().err


def test_source_file_not_archive(isolated, tmp_path, capsys):
    not_archive = tmp_path / "DomainBed.tar.gz"
    not_archive.write_text("not a tar file")

    code = install_domainbed.main(install_args(isolated, "--source", str(not_archive)))

    assert code == 1
    assert "{} (from --source) is not a .tar or .tar.gz archive".format(not_archive) in \
        capsys.readouterr().err


def test_source_folder_without_domainbed(isolated, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()

    code = install_domainbed.main(install_args(isolated, "--source", str(empty)))

    assert code == 1
    assert "{} (from --source) is a folder without domainbed/".format(empty) in \
        capsys.readouterr().err


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_bare_git_without_commit(isolated, tmp_path, capsys):
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "--quiet", "--bare", str(bare)], check=True)

    code = install_domainbed.main(install_args(isolated, "--source", str(bare)))

    error = capsys.readouterr().err
    assert code == 1
    assert "does not contain commit {}".format(DOMAINBED_COMMIT) in error
    assert str(bare) in error


def test_archive_member_outside_rejected(tmp_path):
    archive_path = tmp_path / "evil.tar"
    with tarfile.open(archive_path, "w") as archive:
        data = b"x"
        member = tarfile.TarInfo("../evil.txt")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    target = tmp_path / "target"
    target.mkdir()

    with pytest.raises(install_domainbed.InstallError, match="Failed to extract"):
        install_domainbed.extract_archive(archive_path, target)

    assert not (tmp_path / "evil.txt").exists()


def test_requirements_pin_installed_torch(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        constraints_path = command[command.index("-c") + 1]
        calls.append((command, Path(constraints_path).read_text()))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(install_domainbed.subprocess, "run", fake_run)

    install_domainbed.install_requirements(python="python-under-test")

    (command, constraints), = calls
    assert command[:4] == ["python-under-test", "-m", "pip", "install"]
    assert command[4:7] == ["wilds==2.0.0", "timm", "pandas"]
    torch_version = install_domainbed.importlib.metadata.version("torch")
    assert "torch=={}".format(torch_version) in constraints.splitlines()


def test_requirements_failure_message(monkeypatch):
    monkeypatch.setattr(install_domainbed.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 3))

    with pytest.raises(install_domainbed.InstallError, match="exit code 3.*--no-deps"):
        install_domainbed.install_requirements()


# ---------------------------------------------------------------------------
# Installing the pinned commit


def assert_installed(paths):
    destination = paths["prefix"] / "DomainBed"
    assert domainbed_patch.check_patches(destination)[0] == domainbed_patch.CHECK_APPLIED
    pth_text = (paths["site"] / PTH_FILENAME).read_text()
    assert pth_text == "{}\n".format(destination.resolve())
    return destination


@pytest.mark.domainbed
@pytest.mark.slow
def test_install_from_archive_then_rerun(isolated, pristine_archive, capsys):
    code = install_domainbed.main(install_args(isolated, "--source", str(pristine_archive)))

    output = capsys.readouterr()
    assert code == 0, output.err
    destination = assert_installed(isolated)
    assert str(destination) in output.out
    assert hashes_in_archive(isolated["cache"]) == PRISTINE_HASHES
    staging_leftovers = [path.name for path in isolated["prefix"].iterdir()]
    assert staging_leftovers == ["DomainBed"]

    installed_before = {path: path.stat().st_mtime_ns
                        for path in destination.rglob("*.py")}
    code = install_domainbed.main(install_args(isolated))

    assert code == 0
    assert {path: path.stat().st_mtime_ns for path in destination.rglob("*.py")} == \
        installed_before


@pytest.mark.domainbed
@pytest.mark.slow
def test_install_from_cache_offline(isolated, pristine_archive, capsys):
    isolated["cache"].parent.mkdir(parents=True)
    shutil.copyfile(pristine_archive, isolated["cache"])

    code = install_domainbed.main(install_args(isolated, "--no-network"))

    assert code == 0, capsys.readouterr().err
    assert_installed(isolated)


@pytest.mark.domainbed
@pytest.mark.slow
def test_install_from_patched_working_tree(isolated, pristine_tree, tmp_path, capsys):
    working_tree = tmp_path / "clone"
    shutil.copytree(pristine_tree, working_tree)
    domainbed_patch.apply_patches(working_tree)
    dataset_file = working_tree / "domainbed" / "data" / "MNIST" / "big.bin"
    dataset_file.parent.mkdir(parents=True)
    dataset_file.write_bytes(b"dataset")

    code = install_domainbed.main(install_args(isolated, "--source", str(working_tree)))

    assert code == 0, capsys.readouterr().err
    destination = assert_installed(isolated)
    assert not (destination / "domainbed" / "data").exists()
    assert hashes_in_archive(isolated["cache"]) == PRISTINE_HASHES


@pytest.mark.domainbed
def test_source_of_other_version_rejected(isolated, pristine_tree, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(pristine_tree, other)
    edited = other / "domainbed" / "algorithms.py"
    edited.write_text(edited.read_text().replace("'URM',", "'URM', 'Extra',"))

    code = install_domainbed.main(install_args(isolated, "--source", str(other)))

    error = capsys.readouterr().err
    assert code == 1
    assert "is not commit {}".format(DOMAINBED_COMMIT) in error
    assert "domainbed/algorithms.py: unknown content" in error
    assert not (isolated["prefix"] / "DomainBed").exists()
    assert not isolated["cache"].exists()
    assert not (isolated["site"] / PTH_FILENAME).exists()


@pytest.mark.domainbed
@pytest.mark.slow
def test_existing_other_tree_needs_force(isolated, pristine_archive, capsys):
    destination = isolated["prefix"] / "DomainBed" / "domainbed"
    destination.mkdir(parents=True)
    (destination / "algorithms.py").write_text("# someone else's DomainBed\n")

    code = install_domainbed.main(install_args(isolated, "--source", str(pristine_archive)))

    assert code == 1
    assert "Pass --force to replace it" in capsys.readouterr().err
    assert (destination / "algorithms.py").read_text() == "# someone else's DomainBed\n"

    code = install_domainbed.main(
        install_args(isolated, "--source", str(pristine_archive), "--force"))

    assert code == 0, capsys.readouterr().err
    assert_installed(isolated)


@pytest.mark.domainbed
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_clone_without_commit_copies_tree(isolated, pristine_tree, tmp_path, capsys):
    clone = tmp_path / "clone"
    shutil.copytree(pristine_tree, clone)
    git = ["git", "-C", str(clone), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git + ["init", "--quiet"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "--quiet", "-m", "snapshot"], check=True)

    code = install_domainbed.main(install_args(isolated, "--source", str(clone)))

    assert code == 0, capsys.readouterr().err
    destination = assert_installed(isolated)
    assert not (destination / ".git").exists()
