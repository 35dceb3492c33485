"""The demo's datasets: bundled digits, and CIFAR pickles read from a local folder."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from htakl_kernels.demo.__main__ import main
from htakl_kernels.demo.data import DatasetError, load_cifar, load_dataset, load_digits


def test_digits_split_is_stratified_normalised_and_seeded():
    data = load_digits(seed=3)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train_labels) + len(data.test_labels) == 1797
    for label in range(10):
        train, test = (data.train_labels == label).sum(), (data.test_labels == label).sum()
        assert abs(test / (train + test) - 0.2) < 0.01
    assert abs(data.train_images.mean().item()) < 1e-5
    assert abs(data.train_images.std().item() - 1) < 1e-3
    again, other = load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(again.test_labels, data.test_labels) and torch.equal(again.test_images, data.test_images)
    assert not torch.equal(other.test_images, data.test_images)


def test_subset_keeps_images_with_their_labels():
    data = load_digits(seed=0)
    small = data.subset(50, seed=1)
    assert len(small.train_labels) == 50 and len(small.test_labels) == 50
    for image, label in zip(small.test_images[:5], small.test_labels[:5]):
        match = (data.test_images == image).flatten(1).all(dim=1).nonzero().flatten()
        assert len(match) >= 1 and (data.test_labels[match] == label).all()


def _write_batch(path, data, labels, label_key=b"labels"):
    with open(path, "wb") as handle:
        pickle.dump({b"data": data, label_key: list(labels), b"batch_label": b"fake"}, handle)


def write_fake_cifar10(folder, per_batch=3, seed=0):
    """The five training batches and the test batch, `per_batch` random images each."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch)
        _write_batch(os.path.join(folder, name), data, labels)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_batches_are_read_in_order_and_channel_major(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = write_fake_cifar10(str(folder))
    data = load_dataset("cifar10", str(tmp_path), seed=0)
    train_raw = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert data.train_labels.tolist() == train_labels.tolist()
    assert data.test_labels.tolist() == batches["test_batch"][1].tolist()
    # Undo the per-channel normalisation with the training split's statistics.
    raw = torch.from_numpy(train_raw).float().view(-1, 3, 32, 32) / 255
    mean, std = raw.mean(dim=(0, 2, 3), keepdim=True), raw.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.train_images * std + mean, raw)
    # Pixel (channel 1, row 2, column 5) of the first image is byte 1024 + 2 * 32 + 5.
    restored = data.train_images[0, 1, 2, 5] * std[0, 1, 0, 0] + mean[0, 1, 0, 0]
    assert restored.item() == pytest.approx(train_raw[0, 1024 + 69] / 255, abs=1e-5)


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        _write_batch(str(tmp_path / name), rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
                     [99, 0, 50, 7], label_key=b"fine_labels")
    data = load_dataset("cifar100", str(tmp_path), seed=0)
    assert data.num_classes == 100 and data.test_labels.tolist() == [99, 0, 50, 7]


def test_missing_folder_says_what_is_expected(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="not a folder") as error:
        load_cifar("cifar10", missing)
    assert "cifar-10-batches-py" in str(error.value) and "data_batch_1" in str(error.value)
    with pytest.raises(DatasetError, match="no --data-dir"):
        load_cifar("cifar100", None)
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"contains \['data_batch_1'\]"):
        load_cifar("cifar10", str(tmp_path))


@pytest.mark.parametrize("damage, message", [
    ("garbage", "is not a CIFAR python batch"),
    ("no_labels", "has keys"),
    ("wrong_width", r"b'data' is uint8 \[3, 100\]"),
    ("bad_label", "values out of range"),
])
def test_malformed_batch_names_the_file_and_the_layout(tmp_path, damage, message):
    write_fake_cifar10(str(tmp_path))
    target = str(tmp_path / "data_batch_3")
    if damage == "garbage":
        with open(target, "wb") as handle:
            handle.write(b"not a pickle")
    elif damage == "no_labels":
        with open(target, "wb") as handle:
            pickle.dump({b"data": np.zeros((3, 3072), np.uint8)}, handle)
    elif damage == "wrong_width":
        _write_batch(target, np.zeros((3, 100), np.uint8), [0, 1, 2])
    else:
        _write_batch(target, np.zeros((3, 3072), np.uint8), [0, 10, 2])
    with pytest.raises(DatasetError, match=message) as error:
        load_cifar("cifar10", str(tmp_path))
    assert "data_batch_3" in str(error.value) and "3072" in str(error.value)


def test_cli_reports_a_missing_dataset_folder(tmp_path, capsys):
    status = main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "absent"), "--no-progress",
                   "--out", str(tmp_path / "run")])
    assert status == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
