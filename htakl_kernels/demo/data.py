"""Datasets for the demo, as in-memory tensors: scikit-learn's bundled digits, or CIFAR from disk.

Nothing is downloaded. Digits ship inside scikit-learn (1797 grey 8x8 images, 10 classes).
CIFAR-10/100 are read from the standard "python version" pickle batches that the user already
has in a local folder (the contents of cifar-10-python.tar.gz / cifar-100-python.tar.gz).
Images are normalised per channel with the training split's mean and standard deviation.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100")

# Per dataset: the folder name inside the archive, the training and test files, the label key.
_CIFAR_LAYOUT = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{index}" for index in range(1, 6)],
        test=["test_batch"],
        label_key=b"labels",
        classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python", train=["train"], test=["test"], label_key=b"fine_labels",
        classes=100,
    ),
}
_CIFAR_PIXELS = 3 * 32 * 32


class DatasetError(ValueError):
    """A dataset folder is missing or its files do not have the expected layout."""


@dataclass
class Dataset:
    name: str
    train_images: torch.Tensor  # [N, C, H, W] float32, normalised
    train_labels: torch.Tensor  # [N] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(self.name, self.train_images.to(device), self.train_labels.to(device),
                       self.test_images.to(device), self.test_labels.to(device), self.num_classes)

    def subset(self, count: int, seed: int) -> "Dataset":
        """At most `count` training and `count` test images, drawn at random with `seed`."""
        generator = torch.Generator().manual_seed(seed)

        def pick(images, labels):
            keep = torch.randperm(len(labels), generator=generator)[:count].sort().values
            return images[keep], labels[keep]

        train = pick(self.train_images, self.train_labels)
        test = pick(self.test_images, self.test_labels)
        return Dataset(self.name, *train, *test, self.num_classes)


def _normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    return (train - mean) / std, (test - mean) / std


def load_digits(seed: int, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 digits, split into train/test with a per-class (stratified) shuffle."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)  # [N, 1, 8, 8]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    train_index, test_index = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_count = round(len(members) * test_fraction)
        test_index.append(members[:test_count])
        train_index.append(members[test_count:])
    train_index, test_index = torch.cat(train_index).sort().values, torch.cat(test_index).sort().values
    train_images, test_images = _normalise(images[train_index], images[test_index])
    return Dataset("digits", train_images, labels[train_index], test_images, labels[test_index], 10)


def _read_cifar_file(path: str, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    expected = (
        f"a pickled dict with b'data' (uint8 array [N, {_CIFAR_PIXELS}]) and {label_key!r} "
        f"(N labels in [0, {classes}))"
    )
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except Exception as error:  # any unpickling failure means the file is not a CIFAR batch
        raise DatasetError(f"{path} is not a CIFAR python batch ({error}); expected {expected}") from error
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"{path} has keys {keys}; expected {expected}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS or data.dtype != np.uint8:
        raise DatasetError(f"{path}: b'data' is {data.dtype} {list(data.shape)}; expected {expected}")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
        raise DatasetError(f"{path}: {label_key!r} has shape {list(labels.shape)} or values out of "
                           f"range; expected {expected}")
    return data, labels


def _cifar_split(folder: str, files: list[str], label_key: bytes, classes: int):
    parts = [_read_cifar_file(os.path.join(folder, name), label_key, classes) for name in files]
    data = np.concatenate([part[0] for part in parts])
    labels = np.concatenate([part[1] for part in parts]).astype(np.int64)
    images = torch.from_numpy(data).view(-1, 3, 32, 32).float() / 255.0
    return images, torch.from_numpy(labels)


def load_cifar(name: str, data_dir: str | None) -> Dataset:
    """CIFAR-10/100 from the python pickle batches in `data_dir` (or its standard subfolder)."""
    layout = _CIFAR_LAYOUT[name]
    wanted = layout["train"] + layout["test"]
    expectation = (
        f"--dataset {name} needs --data-dir pointing at the extracted python version of the "
        f"dataset: a folder (or its parent) named {layout['folder']!r} holding {', '.join(wanted)}"
    )
    if data_dir is None:
        raise DatasetError(f"{expectation}; no --data-dir was given")
    candidates = [data_dir, os.path.join(data_dir, layout["folder"])]
    folder = next(
        (path for path in candidates if all(os.path.isfile(os.path.join(path, f)) for f in wanted)), None
    )
    if folder is None:
        if not os.path.isdir(data_dir):
            raise DatasetError(f"{expectation}; {data_dir!r} is not a folder")
        present = sorted(os.listdir(data_dir))
        raise DatasetError(f"{expectation}; {data_dir!r} contains {present}")
    train_images, train_labels = _cifar_split(folder, layout["train"], layout["label_key"], layout["classes"])
    test_images, test_labels = _cifar_split(folder, layout["test"], layout["label_key"], layout["classes"])
    train_images, test_images = _normalise(train_images, test_images)
    return Dataset(name, train_images, train_labels, test_images, test_labels, layout["classes"])


def load_dataset(name: str, data_dir: str | None, seed: int) -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name in _CIFAR_LAYOUT:
        return load_cifar(name, data_dir)
    raise DatasetError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
