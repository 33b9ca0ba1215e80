"""Install the pinned DomainBed commit, with the plugin hooks, into this Python.

DomainBed has no setup.py, so this module copies the commit
``domainbed_patch.DOMAINBED_COMMIT`` into ``<prefix>/DomainBed``, applies the
diffs of ``patches/``, and puts that folder on ``sys.path`` through a ``.pth``
file in this environment's site-packages. Afterwards
``python -m domainbed.scripts.train`` works from any folder.

Usage::

    python -m jps_domainbed.install_domainbed [--source PATH_OR_URL] [--prefix DIR]
                                              [--no-deps] [--no-network]

The source is the first of: ``--source``, the environment variable
JPS_DOMAINBED_SOURCE, the per-user cache archive (cache_archive_path), and a
download of the GitHub archive. A source may be a DomainBed working tree, a
bare or non-bare git repository that contains the commit, a .tar or .tar.gz
archive, or an http(s) URL of such an archive. Every source is checked against
the SHA-256 of the files that the diffs change. After an install from any
source other than the cache, the pristine tree is saved as the cache archive,
so later installs work offline.
"""

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from jps_domainbed import domainbed_patch
from jps_domainbed.domainbed_patch import DOMAINBED_COMMIT, DOMAINBED_REPOSITORY

logger = logging.getLogger(__name__)

SOURCE_ENV_VAR = "JPS_DOMAINBED_SOURCE"
DOWNLOAD_URL = "{}/archive/{}.tar.gz".format(DOMAINBED_REPOSITORY, DOMAINBED_COMMIT)
DOWNLOAD_TIMEOUT_S = 20
ARCHIVE_TOP_FOLDER = "DomainBed-{}".format(DOMAINBED_COMMIT)
INSTALL_FOLDER = "DomainBed"
PTH_FILENAME = "jps_domainbed_domainbed.pth"
# Packages that DomainBed imports besides torch and torchvision: datasets.py imports
# wilds, networks.py imports timm, and the scripts use pandas.
RUNTIME_REQUIREMENTS = ["wilds==2.0.0", "timm", "pandas"]
SMOKE_CHECK_TIMEOUT_S = 600
SOURCE_KINDS_HELP = (
    "a DomainBed working tree, a git repository (bare or not) that contains "
    "commit {commit}, a .tar/.tar.gz archive of it such as {url}, or an "
    "http(s) URL of that archive").format(commit=DOMAINBED_COMMIT, url=DOWNLOAD_URL)


class InstallError(Exception):
    """Installation failure, with a message that names the bad value and the fix."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Location of the DomainBed files and the setting that chose it."""

    location: str
    origin: str  # "--source", SOURCE_ENV_VAR, "cache" or "download"

    def describe(self):
        if self.origin in ("--source", SOURCE_ENV_VAR):
            return "{} (from {})".format(self.location, self.origin)
        if self.origin == "cache":
            return "cache archive {}".format(self.location)
        return "download {}".format(self.location)


def cache_archive_path(environ=None):
    """Return ``${XDG_CACHE_HOME:-~/.cache}/jps-domainbed/DomainBed-<commit>.tar.gz``."""
    environ = os.environ if environ is None else environ
    cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "jps-domainbed" / "{}.tar.gz".format(ARCHIVE_TOP_FOLDER)


# ---------------------------------------------------------------------------
# Finding the source


def _no_source_error(lookups):
    lines = ["DomainBed commit {} was not found. Looked in:".format(DOMAINBED_COMMIT)]
    lines.extend("  {}".format(lookup) for lookup in lookups)
    lines.append(
        "Pass --source PATH_OR_URL, or set {}=PATH_OR_URL, to {}.".format(
            SOURCE_ENV_VAR, SOURCE_KINDS_HELP))
    return InstallError("\n".join(lines))


def resolve_source(explicit_source=None, no_network=False, environ=None):
    """Return the first available Source, in the order of the module docstring.

    Returns (Source, lookups), where lookups lists the places checked so far,
    for the error message if the download fails.
    """
    environ = os.environ if environ is None else environ
    if explicit_source:
        return Source(str(explicit_source), "--source"), []
    lookups = ["--source: not given"]

    env_source = environ.get(SOURCE_ENV_VAR, "")
    if env_source:
        return Source(env_source, SOURCE_ENV_VAR), lookups
    lookups.append("{}: not set".format(SOURCE_ENV_VAR))

    cache = cache_archive_path(environ)
    if cache.is_file():
        return Source(str(cache), "cache"), lookups
    lookups.append("cache archive {}: not found".format(cache))

    if no_network:
        lookups.append("download {}: skipped (--no-network)".format(DOWNLOAD_URL))
        raise _no_source_error(lookups)
    return Source(DOWNLOAD_URL, "download"), lookups


# ---------------------------------------------------------------------------
# Copying a source into a staging folder


def _is_url(location):
    return location.startswith(("http://", "https://"))


def _is_bare_git_dir(path):
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def download_archive(url, destination, timeout_s=DOWNLOAD_TIMEOUT_S):
    """Download `url` to the file `destination`."""
    logger.info("Downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            with open(destination, "wb") as output:
                shutil.copyfileobj(response, output)
    except (urllib.error.URLError, OSError) as error:
        raise InstallError("Download of {} failed: {}".format(url, error)) from error


def extract_archive(archive_path, target_dir):
    """Extract a tar archive into `target_dir` and return the DomainBed root in it.

    The root is `target_dir` itself or its only top-level folder, such as the
    ``DomainBed-<commit>/`` folder of GitHub's archives.
    """
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(target_dir, filter="data")
            else:  # Python before 3.9.17, 3.10.12 and 3.11.4
                archive.extractall(target_dir, members=_checked_members(archive))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InstallError("Failed to extract {}: {}".format(archive_path, error)) from error
    return _find_tree_root(Path(target_dir), archive_path)


def _checked_members(archive):
    for member in archive.getmembers():
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise InstallError("Archive member {!r} points outside the archive".format(
                member.name))
        if not (member.isfile() or member.isdir()):
            raise InstallError("Archive member {!r} is not a regular file or folder".format(
                member.name))
        yield member


def _find_tree_root(directory, source):
    if (directory / "domainbed" / "algorithms.py").is_file():
        return directory
    children = [child for child in directory.iterdir() if child.is_dir()]
    if len(children) == 1 and (children[0] / "domainbed" / "algorithms.py").is_file():
        return children[0]
    raise InstallError(
        "{} does not contain domainbed/algorithms.py at its top level or in a "
        "single top-level folder, so it is not a DomainBed archive".format(source))


def _run_git(git_args, failure_message):
    try:
        return subprocess.run(["git"] + git_args, check=True, capture_output=True)
    except FileNotFoundError:
        raise InstallError(failure_message + ": git is not installed") from None
    except subprocess.CalledProcessError as error:
        stderr = error.stderr.decode("utf-8", "replace").strip()
        raise InstallError("{}: {}".format(failure_message, stderr)) from error


def _git_has_commit(git_args):
    try:
        result = subprocess.run(
            ["git"] + git_args + ["cat-file", "-e", DOMAINBED_COMMIT + "^{commit}"],
            capture_output=True)
    except FileNotFoundError:
        return False
    return result.returncode == 0


def export_git_commit(git_args, location, target_dir):
    """Write the pinned commit of a git repository into `target_dir` with git archive."""
    archive_path = Path(target_dir) / "git-archive.tar"
    result = _run_git(
        git_args + ["archive", "--format=tar", DOMAINBED_COMMIT],
        "git archive of commit {} from {} failed".format(DOMAINBED_COMMIT, location))
    archive_path.write_bytes(result.stdout)
    tree_dir = Path(target_dir) / "tree"
    tree_dir.mkdir()
    root = extract_archive(archive_path, tree_dir)
    archive_path.unlink()
    return root


def copy_working_tree(source_dir, target_dir):
    """Copy a DomainBed working tree without git data, bytecode caches and datasets."""
    source_dir = Path(source_dir)
    # domainbed/data is DomainBed's default --data_dir, which can hold
    # hundreds of GB of datasets.
    skipped_data_dir = (source_dir / "domainbed" / "data").resolve()

    def ignore(directory, names):
        ignored = {name for name in names if name in (".git", "__pycache__")}
        if Path(directory).resolve() == skipped_data_dir.parent and "data" in names:
            ignored.add("data")
        return ignored

    tree_dir = Path(target_dir) / "tree"
    shutil.copytree(source_dir, tree_dir, symlinks=True, ignore=ignore)
    return tree_dir


def stage_source(source, staging_dir):
    """Copy `source` into `staging_dir` and return the DomainBed root there."""
    staging_dir = Path(staging_dir)
    location = source.location
    if _is_url(location):
        archive_path = staging_dir / "download.tar.gz"
        download_archive(location, archive_path)
        tree_dir = staging_dir / "tree"
        tree_dir.mkdir()
        root = extract_archive(archive_path, tree_dir)
        archive_path.unlink()
        return root

    path = Path(location).expanduser()
    if not path.exists():
        raise InstallError(
            "DomainBed source {} not found. Pass {}.".format(
                source.describe(), SOURCE_KINDS_HELP))
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise InstallError(
                "DomainBed source {} is not a .tar or .tar.gz archive. Pass {}.".format(
                    source.describe(), SOURCE_KINDS_HELP))
        tree_dir = staging_dir / "tree"
        tree_dir.mkdir()
        return extract_archive(path, tree_dir)

    if (path / ".git").exists():
        git_args = ["-C", str(path)]
        if _git_has_commit(git_args):
            return export_git_commit(git_args, path, staging_dir)
        # A shallow clone or a clone without git installed: the hash check
        # decides whether the checked-out files are the pinned commit.
        logger.info("%s has no git commit %s (or git is missing), so its "
                    "working tree is copied", path, DOMAINBED_COMMIT)
        return copy_working_tree(path, staging_dir)
    if _is_bare_git_dir(path):
        git_args = ["--git-dir", str(path)]
        if not _git_has_commit(git_args):
            raise InstallError(
                "Git repository {} does not contain commit {} (or git is not "
                "installed). Fetch it with `git --git-dir {} fetch {} {}`, or "
                "pass another source.".format(
                    source.describe(), DOMAINBED_COMMIT, path,
                    DOMAINBED_REPOSITORY, DOMAINBED_COMMIT))
        return export_git_commit(git_args, path, staging_dir)
    if (path / "domainbed").is_dir():
        return copy_working_tree(path, staging_dir)
    raise InstallError(
        "DomainBed source {} is a folder without domainbed/ and is not a git "
        "repository. Pass {}.".format(source.describe(), SOURCE_KINDS_HELP))


def verify_source_tree(root, source):
    """Raise InstallError unless the staged tree is the pinned commit."""
    if not (Path(root) / "domainbed").is_dir():
        raise InstallError("DomainBed source {} has no domainbed/ folder".format(
            source.describe()))
    states = domainbed_patch.inspect_tree(root)
    bad_states = [s for s in states if s.state in (domainbed_patch.OTHER,
                                                   domainbed_patch.MISSING)]
    if not bad_states:
        return
    lines = ["DomainBed source {} is not commit {}:".format(
        source.describe(), DOMAINBED_COMMIT)]
    for state in bad_states:
        if state.state == domainbed_patch.MISSING:
            lines.append("  {}: missing".format(state.relative_path))
        else:
            lines.append("  {}: unknown content (SHA-256 {})".format(
                state.relative_path, state.sha256))
    if source.origin == "cache":
        lines.append("Delete the cache archive and run the installer again with --source.")
    else:
        lines.append("Pass a source at commit {}.".format(DOMAINBED_COMMIT))
    raise InstallError("\n".join(lines))


def stage_pristine_tree(source, staging_dir):
    """Copy `source` into `staging_dir`, verify it and return its pristine DomainBed root.

    A working tree that already carries the hooks is reverted, so the result
    always has the files of the pinned commit.
    """
    root = stage_source(source, staging_dir)
    verify_source_tree(root, source)
    domainbed_patch.revert_patches(root)
    return root


# ---------------------------------------------------------------------------
# Writing the results


def write_cache_archive(root, destination_dir):
    """Write `root` as a .tar.gz with the top folder of GitHub's archive.

    Returns the path of a temporary file in `destination_dir`. The caller
    renames it into place once the install has succeeded.
    """
    destination_dir = Path(destination_dir)
    destination_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=destination_dir, prefix=".{}.".format(ARCHIVE_TOP_FOLDER), suffix=".tar.gz.tmp")
    os.close(handle)

    def reset_owner(member):
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        return member

    try:
        with tarfile.open(temporary, "w:gz") as archive:
            archive.add(root, arcname=ARCHIVE_TOP_FOLDER, filter=reset_owner)
        os.chmod(temporary, 0o644)
    except BaseException:
        os.unlink(temporary)
        raise
    return Path(temporary)


def _replace_tree(new_root, destination):
    """Move `new_root` to `destination`, replacing an existing folder there."""
    destination = Path(destination)
    old_copy = None
    if destination.exists():
        old_copy = Path(tempfile.mkdtemp(prefix=".DomainBed-old-", dir=destination.parent))
        os.replace(destination, old_copy / INSTALL_FOLDER)
    try:
        os.replace(new_root, destination)
    except OSError:
        if old_copy is not None:
            os.replace(old_copy / INSTALL_FOLDER, destination)
        raise
    if old_copy is not None:
        shutil.rmtree(old_copy)


def write_pth_file(site_dir, domainbed_root):
    """Write PTH_FILENAME, which adds `domainbed_root` to sys.path, into `site_dir`."""
    site_dir = Path(site_dir)
    pth_path = site_dir / PTH_FILENAME
    content = "{}\n".format(Path(domainbed_root).resolve())
    if pth_path.is_file() and pth_path.read_text() == content:
        return pth_path
    try:
        site_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=site_dir, prefix="." + PTH_FILENAME)
        with os.fdopen(handle, "w") as output:
            output.write(content)
        os.chmod(temporary, 0o644)
        os.replace(temporary, pth_path)
    except OSError as error:
        raise InstallError(
            "Failed to write {}: {}. Run the installer with the Python of an "
            "environment that you can write to, such as a virtualenv.".format(
                pth_path, error)) from error
    return pth_path


def install_requirements(python=sys.executable):
    """Pip-install RUNTIME_REQUIREMENTS with the installed torch and torchvision pinned."""
    constraints = []
    for distribution in ("torch", "torchvision"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            if distribution == "torch":
                raise InstallError(
                    "torch is not installed in {}. Install torch first (make "
                    "venv installs the pinned version), or pass --no-deps.".format(
                        sys.prefix)) from None
            continue
        constraints.append("{}=={}".format(distribution, version))

    handle, constraints_path = tempfile.mkstemp(prefix="jps-domainbed-constraints-",
                                                suffix=".txt")
    try:
        with os.fdopen(handle, "w") as output:
            output.write("\n".join(constraints) + "\n")
        command = [python, "-m", "pip", "install", *RUNTIME_REQUIREMENTS,
                   "-c", constraints_path]
        logger.info("Running %s (constraints: %s)", " ".join(command), ", ".join(constraints))
        result = subprocess.run(command)
    finally:
        os.unlink(constraints_path)
    if result.returncode != 0:
        raise InstallError(
            "pip install {} failed with exit code {}. Fix the pip error above, "
            "or pass --no-deps and install them yourself.".format(
                " ".join(RUNTIME_REQUIREMENTS), result.returncode))


# A site folder that is not on sys.path (--site-packages pointing elsewhere)
# is processed like site-packages but placed first, as if it were the
# site-packages of the environment that will use it.
_SMOKE_CHECK_CODE = """\
import site, sys
if sys.argv[1] not in sys.path:
    before = list(sys.path)
    site.addsitedir(sys.argv[1])
    sys.path[:] = [p for p in sys.path if p not in before] + before
import domainbed, domainbed.algorithms
print(domainbed.__file__)
"""


def smoke_check(domainbed_root, site_dir, python=sys.executable):
    """Import domainbed.algorithms in a fresh interpreter and check where it comes from.

    PYTHONPATH is removed and the working folder is the parent of
    `domainbed_root`, so the import goes through the .pth file.
    """
    domainbed_root = Path(domainbed_root).resolve()
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)
    try:
        result = subprocess.run(
            [python, "-c", _SMOKE_CHECK_CODE, str(site_dir)],
            cwd=domainbed_root.parent, env=environment, capture_output=True,
            text=True, timeout=SMOKE_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise InstallError("`import domainbed.algorithms` timed out after {} s".format(
            SMOKE_CHECK_TIMEOUT_S)) from error
    if result.returncode != 0:
        raise InstallError(
            "`import domainbed.algorithms` failed in {}:\n{}\nIf a module is "
            "missing, run the installer without --no-deps.".format(
                python, result.stderr.strip()[-3000:]))
    imported_file = Path(result.stdout.strip().splitlines()[-1]).resolve()
    if domainbed_root not in imported_file.parents:
        raise InstallError(
            "`import domainbed` loads {}, not the installed {}. Remove the other "
            "DomainBed from sys.path (PYTHONPATH, other .pth files or pip "
            "installs).".format(imported_file, domainbed_root))


# ---------------------------------------------------------------------------
# The installation


def _install_tree_from_source(source, lookups, prefix, destination):
    """Stage, verify, cache and patch a source, then move it to `destination`."""
    staging_dir = Path(tempfile.mkdtemp(prefix=".DomainBed-staging-", dir=prefix))
    cache_temporary = None
    try:
        try:
            root = stage_pristine_tree(source, staging_dir)
        except InstallError as error:
            if source.origin == "download":
                raise _no_source_error(
                    lookups + ["download {}: failed ({})".format(
                        source.location, error.__cause__ or error)]) from error
            raise

        cache_path = cache_archive_path()
        if not _is_same_file(source.location, cache_path):
            try:
                cache_temporary = write_cache_archive(root, cache_path.parent)
            except OSError as error:
                logger.warning("Failed to write the cache archive %s: %s", cache_path, error)

        domainbed_patch.apply_patches(root)
        _replace_tree(root, destination)

        if cache_temporary is not None:
            os.replace(cache_temporary, cache_path)
            cache_temporary = None
            logger.info("Saved DomainBed to the cache archive %s", cache_path)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
        if cache_temporary is not None and cache_temporary.exists():
            cache_temporary.unlink()


def _is_same_file(location, path):
    if _is_url(location):
        return False
    try:
        return Path(location).expanduser().resolve() == Path(path).resolve()
    except OSError:
        return False


def _existing_tree_state(destination):
    """Return "patched", "pinned" (pristine or partly patched) or "other"."""
    states = domainbed_patch.inspect_tree(destination)
    kinds = {state.state for state in states}
    if kinds == {domainbed_patch.PATCHED}:
        return "patched"
    if kinds <= {domainbed_patch.PATCHED, domainbed_patch.PRISTINE}:
        return "pinned"
    return "other"


def install(source=None, prefix=None, no_deps=False, no_network=False,
            site_dir=None, force=False):
    """Install DomainBed with the plugin hooks and return its root folder.

    An existing ``<prefix>/DomainBed`` at the pinned commit is reused (and
    patched if needed) without reading any source, unless `force` is set.
    """
    prefix = Path(prefix if prefix is not None else Path(sys.prefix) / "src")
    prefix = prefix.expanduser().resolve()
    destination = prefix / INSTALL_FOLDER
    site_dir = Path(site_dir if site_dir is not None else sysconfig.get_paths()["purelib"])

    existing = _existing_tree_state(destination) if destination.exists() else None
    if existing == "other" and not force:
        raise InstallError(
            "{} exists but is not DomainBed commit {} with or without the "
            "hooks. Pass --force to replace it (this deletes the folder and "
            "anything stored in it), or choose another --prefix.".format(
                destination, DOMAINBED_COMMIT))

    if existing in ("patched", "pinned") and not force:
        if source:
            logger.info("DomainBed is already installed at %s, so --source %s was "
                        "not read; pass --force to reinstall from it",
                        destination, source)
        else:
            logger.info("DomainBed is already installed at %s", destination)
        if existing == "pinned":
            domainbed_patch.apply_patches(destination)
    else:
        resolved, lookups = resolve_source(source, no_network)
        logger.info("Installing DomainBed commit %s from %s into %s",
                    DOMAINBED_COMMIT, resolved.describe(), destination)
        prefix.mkdir(parents=True, exist_ok=True)
        _install_tree_from_source(resolved, lookups, prefix, destination)

    pth_path = write_pth_file(site_dir, destination)
    logger.info("Wrote %s", pth_path)
    if not no_deps:
        install_requirements()
    smoke_check(destination, site_dir)
    return destination


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m jps_domainbed.install_domainbed",
        description="Install DomainBed commit {} with the jps-domainbed plugin "
                    "hooks into this Python environment.".format(DOMAINBED_COMMIT))
    parser.add_argument(
        "--source",
        help="where to copy DomainBed from: {} (default: ${}, then the cache "
             "archive {}, then a download from GitHub)".format(
                 SOURCE_KINDS_HELP, SOURCE_ENV_VAR, cache_archive_path()))
    parser.add_argument(
        "--prefix", type=Path,
        help="install into PREFIX/DomainBed (default: {})".format(
            Path(sys.prefix) / "src"))
    parser.add_argument(
        "--no-deps", action="store_true",
        help="do not pip-install DomainBed's requirements ({})".format(
            " ".join(RUNTIME_REQUIREMENTS)))
    parser.add_argument(
        "--no-network", action="store_true",
        help="never download DomainBed from GitHub (pip may still use the network)")
    parser.add_argument(
        "--force", action="store_true",
        help="replace an existing PREFIX/DomainBed, deleting anything stored in it")
    parser.add_argument(
        "--site-packages", type=Path,
        help="folder for the {} file (default: this Python's purelib, {})".format(
            PTH_FILENAME, sysconfig.get_paths()["purelib"]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        destination = install(
            source=args.source, prefix=args.prefix, no_deps=args.no_deps,
            no_network=args.no_network, site_dir=args.site_packages, force=args.force)
    except (InstallError, domainbed_patch.PatchError) as error:
        print("error: {}".format(error), file=sys.stderr)
        return 1
    print("DomainBed commit {} with the plugin hooks is installed at {}".format(
        DOMAINBED_COMMIT, destination))
    return 0


if __name__ == "__main__":
    sys.exit(main())
