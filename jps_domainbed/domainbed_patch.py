"""Apply, check and revert the plugin hooks in a DomainBed checkout.

DomainBed (https://github.com/facebookresearch/DomainBed) has no plugin
mechanism, so this package ships two unified diffs against the pinned commit
DOMAINBED_COMMIT, in ``patches/``:

* ``domainbed-plugins.patch`` (``plugins``) changes ``domainbed/algorithms.py``
  and ``domainbed/hparams_registry.py`` so that they read the entry-point groups
  ``domainbed.algorithms`` and ``domainbed.hparams``.
* ``domainbed-launchers.patch`` (``launchers``) changes
  ``domainbed/command_launchers.py`` so that it reads the group
  ``domainbed.command_launchers``.

Every target file is identified by its SHA-256 in the pristine and in the
patched state (PATCHES). A file in any other state stops the operation before
anything is written, so the diffs are applied with exact context only. The
module needs neither git nor the ``patch`` program.

Usage::

    python -m jps_domainbed.domainbed_patch {apply,check,revert} [DOMAINBED_DIR]
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DOMAINBED_COMMIT = "b93c22a1cfc3b2428398272c1a116c8de1f4139e"
DOMAINBED_REPOSITORY = "https://github.com/facebookresearch/DomainBed"


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """One diff of ``patches/`` and the SHA-256 of each file that it changes."""

    name: str
    filename: str
    # {path relative to the DomainBed root: (pristine SHA-256, patched SHA-256)}
    files: dict


# The hashes are computed from `git archive` of DOMAINBED_COMMIT (pristine)
# and from the same files after applying the diff (patched). Update them
# whenever a diff in patches/ changes: apply_patches rejects a diff whose
# result does not match.
PATCHES = {
    "plugins": PatchSpec(
        name="plugins",
        filename="domainbed-plugins.patch",
        files={
            "domainbed/algorithms.py": (
                "1e4a0353e2c6e42460a43d9cba0bc97e49fec0f5163a39c2c13cadc2ac50eaac",
                "33c8465ef9ba218e6a33f79298cfeffaf821dd7cb453a3a63d223dce6847cfae",
            ),
            "domainbed/hparams_registry.py": (
                "6deec4fceaa98ceab95e89a18358868b1653e3382ca8444ba14eacb2d21b56ea",
                "04c28cce46ac415d10c79552fbd8c743e3ca3d1c776ae8ef13ff64d2d7290d02",
            ),
        },
    ),
    "launchers": PatchSpec(
        name="launchers",
        filename="domainbed-launchers.patch",
        files={
            "domainbed/command_launchers.py": (
                "b10e9408a63140ee38e19bde1d18e218704cadf0fbb3e7db8116c3ba5c6e6d57",
                "f96e72570fbee7dfba421ef0a0468268364d7c25adeda7881384d15e78553b50",
            ),
        },
    ),
}

PRISTINE = "pristine"
PATCHED = "patched"
OTHER = "other"
MISSING = "missing"

# Exit codes of `check`. The apply and revert commands exit with CHECK_OTHER on any error.
CHECK_APPLIED = 0
CHECK_NOT_APPLIED = 1
CHECK_OTHER = 2


class PatchError(Exception):
    """A DomainBed tree or a diff cannot be patched as requested."""


class DomainBedVersionError(PatchError):
    """A target file is missing or matches neither the pristine nor the patched hash."""


@dataclasses.dataclass(frozen=True)
class FileState:
    """The state of one target file in a DomainBed tree."""

    relative_path: str
    path: Path
    state: str  # PRISTINE, PATCHED, OTHER or MISSING
    sha256: str  # empty when the file is missing
    patch_name: str


# ---------------------------------------------------------------------------
# Locating the tree and the diffs


def default_domainbed_dir():
    """Return the directory that contains the importable ``domainbed`` package.

    The package is located without importing it, so a broken or unpatched
    DomainBed cannot fail here.
    """
    spec = importlib.util.find_spec("domainbed")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError(
            "DomainBed is not importable from this Python ({}). Pass the "
            "DomainBed directory (the folder that contains domainbed/), or "
            "install it with: python -m jps_domainbed.install_domainbed".format(
                sys.executable))
    package_dir = Path(list(spec.submodule_search_locations)[0])
    return package_dir.parent


def default_patch_dir():
    """Return the folder that contains the ``*.patch`` files.

    A ``patches`` folder inside the package wins over the one at the
    repository root, which is where a source checkout or an editable install
    keeps them.
    """
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "patches", package_dir.parent / "patches"):
        if (candidate / PATCHES["plugins"].filename).is_file():
            return candidate
    # NOTE: setup.cfg does not list patches/ as package data, so a
    # non-editable install has no diffs unless they are copied into the package.
    raise PatchError(
        "The DomainBed diffs were not found in {} or {}. Use a source "
        "checkout or an editable install (pip install -e), or pass "
        "--patch-dir.".format(package_dir / "patches", package_dir.parent / "patches"))


def _select_patches(names):
    if names is None:
        return list(PATCHES.values())
    selected = []
    for name in names:
        if name not in PATCHES:
            raise PatchError("Unknown patch {!r}. Expected one of: {}".format(
                name, ", ".join(PATCHES)))
        if PATCHES[name] not in selected:
            selected.append(PATCHES[name])
    return selected


# ---------------------------------------------------------------------------
# Inspecting a tree


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inspect_tree(domainbed_dir, names=None):
    """Return the FileState of every file that the selected patches change."""
    root = Path(domainbed_dir)
    states = []
    for spec in _select_patches(names):
        for relative_path, (pristine_hash, patched_hash) in spec.files.items():
            path = root / relative_path
            if not path.is_file():
                states.append(FileState(relative_path, path, MISSING, "", spec.name))
                continue
            digest = sha256_file(path)
            if digest == pristine_hash:
                state = PRISTINE
            elif digest == patched_hash:
                state = PATCHED
            else:
                state = OTHER
            states.append(FileState(relative_path, path, state, digest, spec.name))
    return states


def version_error(domainbed_dir, bad_states):
    """Build the DomainBedVersionError that names each unknown or missing file."""
    lines = ["{} is not DomainBed commit {}:".format(domainbed_dir, DOMAINBED_COMMIT)]
    for file_state in bad_states:
        if file_state.state == MISSING:
            lines.append("  {}: missing".format(file_state.path))
        else:
            lines.append("  {}: unknown content (SHA-256 {})".format(
                file_state.path, file_state.sha256))
    lines.append(
        "Nothing was written. In a git clone, check out the pinned files with "
        "`git -C {} checkout {} -- domainbed`; otherwise install a fresh copy "
        "with `python -m jps_domainbed.install_domainbed`.".format(
            domainbed_dir, DOMAINBED_COMMIT))
    return DomainBedVersionError("\n".join(lines))


def verify_tree(domainbed_dir, names=None):
    """Return the FileStates, raising DomainBedVersionError unless all are known.

    The known states are pristine and patched. A tree may mix them, for
    example after an interrupted apply.
    """
    root = Path(domainbed_dir)
    if not (root / "domainbed").is_dir():
        raise PatchError(
            "{} does not contain a domainbed/ package folder. Pass the "
            "DomainBed root directory (the folder that contains "
            "domainbed/).".format(root))
    states = inspect_tree(root, names)
    bad_states = [s for s in states if s.state in (OTHER, MISSING)]
    if bad_states:
        raise version_error(root, bad_states)
    return states


# ---------------------------------------------------------------------------
# Unified diffs


@dataclasses.dataclass
class Hunk:
    old_start: int
    old_length: int
    new_start: int
    new_length: int
    # (" " | "-" | "+", line text including its line break, if any)
    lines: list

    def reversed(self):
        swap = {"+": "-", "-": "+", " ": " "}
        return Hunk(self.new_start, self.new_length, self.old_start,
                    self.old_length, [(swap[tag], text) for tag, text in self.lines])


@dataclasses.dataclass
class FileDiff:
    relative_path: str
    hunks: list


_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _split_lines(text):
    """Split at "\\n" only, keeping the line breaks (unlike str.splitlines)."""
    pieces = text.split("\n")
    lines = [piece + "\n" for piece in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


def _strip_prefix(path):
    path = path.split("\t", 1)[0].strip()
    if path.startswith(("a/", "b/")):
        return path[2:]
    return path


def parse_unified_diff(text, source="<diff>"):
    """Parse a unified diff into FileDiffs with paths relative to the tree root.

    Supports the output of ``diff -u`` and ``git diff`` for changed text
    files. File creation, deletion and renames raise PatchError because the
    DomainBed diffs never need them.
    """
    lines = _split_lines(text)
    file_diffs = []
    current = None
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("--- "):
            if index + 1 >= len(lines) or not lines[index + 1].startswith("+++ "):
                raise PatchError("{}:{}: '---' line without '+++' line".format(
                    source, index + 1))
            old_path = _strip_prefix(line[4:])
            new_path = _strip_prefix(lines[index + 1][4:])
            if old_path != new_path or old_path == "/dev/null":
                raise PatchError(
                    "{}:{}: only in-place changes are supported, found {} -> {}".format(
                        source, index + 1, old_path, new_path))
            current = FileDiff(new_path, [])
            file_diffs.append(current)
            index += 2
            continue
        header = _HUNK_HEADER.match(line)
        if header:
            if current is None:
                raise PatchError("{}:{}: hunk before any file header".format(
                    source, index + 1))
            hunk, index = _parse_hunk(lines, index, header, source)
            current.hunks.append(hunk)
            continue
        # Other lines ("diff --git", "index ...", comments) carry no change.
        index += 1
    if not file_diffs:
        raise PatchError("{}: no file changes found".format(source))
    return file_diffs


def _parse_hunk(lines, index, header, source):
    old_start = int(header.group(1))
    old_length = int(header.group(2)) if header.group(2) is not None else 1
    new_start = int(header.group(3))
    new_length = int(header.group(4)) if header.group(4) is not None else 1
    hunk = Hunk(old_start, old_length, new_start, new_length, [])
    old_seen = new_seen = 0
    index += 1
    while old_seen < old_length or new_seen < new_length:
        if index >= len(lines):
            raise PatchError("{}: hunk at line {} is truncated".format(
                source, header.string))
        line = lines[index]
        tag, text = line[:1], line[1:]
        if line == "\n":  # some tools drop the space of an empty context line
            tag, text = " ", "\n"
        if tag not in (" ", "-", "+"):
            raise PatchError("{}:{}: unexpected line in hunk: {!r}".format(
                source, index + 1, line))
        hunk.lines.append((tag, text))
        if tag in (" ", "-"):
            old_seen += 1
        if tag in (" ", "+"):
            new_seen += 1
        index += 1
        if index < len(lines) and lines[index].startswith("\\"):
            # "\ No newline at end of file" applies to the line before it.
            last_tag, last_text = hunk.lines[-1]
            hunk.lines[-1] = (last_tag, last_text.rstrip("\n"))
            index += 1
    return hunk, index


def apply_file_diff(text, file_diff, reverse=False, source="<file>"):
    """Return `text` with the hunks of `file_diff` applied at their exact lines.

    Raises PatchError when a context or removed line differs from `text`.
    """
    original = _split_lines(text)
    result = []
    position = 0  # index into `original` of the next line to copy
    for hunk in file_diff.hunks:
        if reverse:
            hunk = hunk.reversed()
        # A hunk that only adds lines names the line after which it inserts.
        start = hunk.old_start - 1 if hunk.old_length else hunk.old_start
        if start < position:
            raise PatchError("{}: overlapping hunks at line {}".format(
                source, hunk.old_start))
        result.extend(original[position:start])
        position = start
        for tag, expected in hunk.lines:
            if tag == "+":
                result.append(expected)
                continue
            if position >= len(original) or original[position] != expected:
                found = original[position] if position < len(original) else "<end of file>"
                raise PatchError(
                    "{}:{}: expected {!r}, found {!r}".format(
                        source, position + 1, expected, found))
            if tag == " ":
                result.append(expected)
            position += 1
    result.extend(original[position:])
    return "".join(result)


def load_patch(spec, patch_dir=None):
    """Read and parse the diff of a PatchSpec, and check that it changes exactly its files."""
    patch_dir = Path(patch_dir) if patch_dir is not None else default_patch_dir()
    path = patch_dir / spec.filename
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PatchError("Patch file {} not found. Pass --patch-dir.".format(path)) from None
    file_diffs = parse_unified_diff(text, source=str(path))
    paths = sorted(diff.relative_path for diff in file_diffs)
    if paths != sorted(spec.files):
        raise PatchError("{} changes {}, expected exactly {}".format(
            path, paths, sorted(spec.files)))
    return {diff.relative_path: diff for diff in file_diffs}


# ---------------------------------------------------------------------------
# Applying and reverting


def _write_atomic(path, data):
    """Replace `path` with `data` through a temporary file in the same folder."""
    path = Path(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(handle, "wb") as output:
            output.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _transform(domainbed_dir, names, patch_dir, reverse):
    """Apply (reverse=False) or revert the selected patches.

    Returns [(FileState, changed)]. Every file is checked and every new content
    is computed and hash-verified before the first write.
    """
    root = Path(domainbed_dir)
    states = verify_tree(root, names)
    source_state, target_state = (PATCHED, PRISTINE) if reverse else (PRISTINE, PATCHED)

    pending = []  # (path, new bytes)
    diffs = {}
    for file_state in states:
        if file_state.state == target_state:
            continue
        spec = PATCHES[file_state.patch_name]
        if spec.name not in diffs:
            diffs[spec.name] = load_patch(spec, patch_dir)
        file_diff = diffs[spec.name][file_state.relative_path]
        text = file_state.path.read_bytes().decode("utf-8")
        new_text = apply_file_diff(text, file_diff, reverse=reverse,
                                   source=str(file_state.path))
        new_bytes = new_text.encode("utf-8")
        expected_hash = spec.files[file_state.relative_path][1 if not reverse else 0]
        actual_hash = hashlib.sha256(new_bytes).hexdigest()
        if actual_hash != expected_hash:
            raise PatchError(
                "{} produced {} with SHA-256 {}, expected {}. The diff and the "
                "hashes in jps_domainbed.domainbed_patch.PATCHES disagree. "
                "Nothing was written.".format(
                    spec.filename, file_state.relative_path, actual_hash, expected_hash))
        pending.append((file_state.path, new_bytes))
        logger.debug("%s: %s -> %s", file_state.path, source_state, target_state)

    for path, data in pending:
        _write_atomic(path, data)
    changed_paths = {path for path, _ in pending}
    return [(state, state.path in changed_paths) for state in states]


def apply_patches(domainbed_dir, names=None, patch_dir=None):
    """Apply the selected patches (default: all) to a DomainBed tree.

    Files already patched are left as they are. Returns [(FileState, changed)],
    where FileState describes the file before the call.
    """
    return _transform(domainbed_dir, names, patch_dir, reverse=False)


def revert_patches(domainbed_dir, names=None, patch_dir=None):
    """Restore the pristine content of the files that the selected patches change."""
    return _transform(domainbed_dir, names, patch_dir, reverse=True)


def check_patches(domainbed_dir, names=None):
    """Return (exit code, message) for the selected patches of a DomainBed tree."""
    root = Path(domainbed_dir)
    try:
        states = verify_tree(root, names)
    except PatchError as error:
        return CHECK_OTHER, str(error)
    if all(s.state == PATCHED for s in states):
        return CHECK_APPLIED, "Plugin hooks are applied in {}".format(root)
    pristine = [str(s.path) for s in states if s.state == PRISTINE]
    if len(pristine) == len(states):
        message = "Plugin hooks are not applied in {} (pristine commit {})".format(
            root, DOMAINBED_COMMIT)
    else:
        message = "Plugin hooks are partially applied in {}. Still pristine: {}".format(
            root, ", ".join(pristine))
    return CHECK_NOT_APPLIED, message + ". Run: python -m jps_domainbed.domainbed_patch apply {}".format(root)


# ---------------------------------------------------------------------------
# Command line


def _print_changes(results, verb):
    changed = [state for state, was_changed in results if was_changed]
    if not changed:
        print("Nothing to do: every file is already {}.".format(verb))
        return
    for state in changed:
        print("{}: {}".format(verb, state.path))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m jps_domainbed.domainbed_patch",
        description="Apply, check or revert the jps-domainbed plugin hooks in a "
                    "DomainBed checkout of commit {}.".format(DOMAINBED_COMMIT))
    parser.add_argument(
        "command", choices=["apply", "check", "revert"],
        help="apply: patch pristine files; check: exit 0 if applied, 1 if not "
             "applied, 2 for another DomainBed version; revert: restore pristine files")
    parser.add_argument(
        "domainbed_dir", nargs="?", type=Path,
        help="DomainBed root, the folder that contains domainbed/ "
             "(default: where the importable domainbed package is)")
    parser.add_argument(
        "--patch", dest="patches", action="append", choices=sorted(PATCHES),
        help="patch to use; repeat for several (default: all)")
    parser.add_argument(
        "--patch-dir", type=Path,
        help="folder with the .patch files (default: the patches/ folder of "
             "this source checkout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        domainbed_dir = args.domainbed_dir or default_domainbed_dir()
        if args.command == "check":
            code, message = check_patches(domainbed_dir, args.patches)
            print(message, file=sys.stderr if code == CHECK_OTHER else sys.stdout)
            return code
        if args.command == "apply":
            results = apply_patches(domainbed_dir, args.patches, args.patch_dir)
            _print_changes(results, "patched")
        else:
            results = revert_patches(domainbed_dir, args.patches, args.patch_dir)
            _print_changes(results, "pristine")
        return 0
    except PatchError as error:
        print("error: {}".format(error), file=sys.stderr)
        return CHECK_OTHER


if __name__ == "__main__":
    sys.exit(main())
