"""Data for examples/bn_vs_no_bn.py: scikit-learn's 8x8 digits, or MNIST from local IDX files.

Contract:
- ``load_dataset(mnist_dir, subset)`` returns ``(name, (x_train, y_train, x_val, y_val))``: images as
  standardised float32 arrays of shape (N, H, W) (the training images' mean and standard deviation,
  after subsetting), labels as stored (int64 for the digits, uint8 for MNIST) of shape (N,).
- ``as_tensors(arrays, images=..., device=..., dtype=...)`` turns those arrays into torch tensors shaped
  for an MLP (N, H*W) or a CNN (N, 1, H, W), with int64 labels, and also returns one sample's shape.
- ``read_idx(path)`` reads one IDX file (plain or ``.gz``) into a numpy array with the file's shape and
  dtype in native byte order, and raises ValueError for a file that is not valid IDX.
- ``load_mnist(directory)`` reads the four standard MNIST IDX files as stored (uint8), raising
  FileNotFoundError for a missing file and ValueError for mismatched images and labels.
Nothing is ever downloaded: the digits ship with scikit-learn and MNIST must already be on disk.
"""
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# IDX type codes (third byte of the magic number) -> numpy dtypes; multi-byte types are big-endian.
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_dataset(mnist_dir=None, subset=None):
    """Loads MNIST from ``mnist_dir`` when given, else scikit-learn's digits; keeps only the first
    ``subset`` training samples when given; standardises the images by the training images' statistics.

    Returns (name, (x_train, y_train, x_val, y_val)) with name "MNIST" or "sklearn digits".
    """
    if mnist_dir:
        x_train, y_train, x_val, y_val = load_mnist(mnist_dir)
        name = "MNIST"
    else:
        x_train, y_train, x_val, y_val = load_digits_data()
        name = "sklearn digits"
    if subset:
        x_train, y_train = x_train[:subset], y_train[:subset]
    x_train, x_val = standardise(x_train, x_val)
    return name, (x_train, y_train, x_val, y_val)


def as_tensors(arrays, *, images, device, dtype):
    """Converts (x_train, y_train, x_val, y_val) numpy arrays to tensors on ``device``: the inputs in
    ``dtype``, shaped (N, 1, H, W) when ``images`` (for a CNN) or flattened to (N, H*W); labels as int64.

    Returns ((x_train, y_train, x_val, y_val), sample_shape), sample_shape being one input's shape.
    """
    x_train, y_train, x_val, y_val = arrays
    image_size = x_train.shape[1:]
    sample_shape = (1, *image_size) if images else (int(np.prod(image_size)),)
    data = (
        torch.from_numpy(x_train).reshape(-1, *sample_shape).to(device, dtype),
        torch.from_numpy(y_train.astype(np.int64)).to(device),
        torch.from_numpy(x_val).reshape(-1, *sample_shape).to(device, dtype),
        torch.from_numpy(y_val.astype(np.int64)).to(device),
    )
    return data, sample_shape


def load_digits_data(val_fraction=0.2, seed=0):
    """Splits scikit-learn's handwritten digits (1797 images, shipped with sklearn) into train and
    validation sets, stratified by class, with a fixed seed.

    Returns (x_train, y_train, x_val, y_val): images as float arrays of shape (N, 8, 8) with the raw
    pixel values 0..16, labels as int64 arrays of shape (N,).
    """
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.images, digits.target.astype(np.int64), test_size=val_fraction, random_state=seed, stratify=digits.target
    )
    return x_train, y_train, x_val, y_val


def read_idx(path):
    """Reads one IDX file (plain, or gzip-compressed when the name ends in ``.gz``).

    Returns its contents as a numpy array with the file's shape and dtype (native byte order).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex()})")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(f"{path}: {len(data) - header} bytes of data, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(directory):
    """Reads MNIST from the four standard IDX files in ``directory`` (each plain or ``.gz``; the plain
    file wins when both exist). Nothing is downloaded.

    Returns (x_train, y_train, x_test, y_test) exactly as stored: uint8 images of shape (N, 28, 28)
    and uint8 labels of shape (N,); the test split serves as the validation set.
    """
    directory = Path(directory).expanduser()
    arrays = []
    for name in MNIST_FILES:
        candidates = [directory / name, directory / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"neither {candidates[0]} nor {candidates[1]} exists")
        arrays.append(read_idx(path))
    x_train, y_train, x_test, y_test = arrays
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    return x_train, y_train, x_test, y_test


def standardise(train, *others):
    """Shifts and scales pixel values by the mean and standard deviation of the training images
    (one scalar each, the usual image normalisation); the validation data does not influence them.

    Returns a list of float32 arrays: the standardised ``train`` followed by the standardised ``others``.
    """
    train = np.asarray(train, dtype=np.float64)
    mean, std = train.mean(), train.std()
    return [((np.asarray(a, dtype=np.float64) - mean) / std).astype(np.float32) for a in (train, *others)]
