"""Data loaders: bundled sets, teachers, npz/csv/IDX/MNIST files, standardisation, seeded splits, errors."""

import gzip
import struct

import numpy as np
import pytest
import torch
from sklearn import datasets as skd

from dropgeom.data import load_dataset, read_idx, write_idx

D = torch.float64


@pytest.mark.parametrize(
    "name,loader",
    [("digits", skd.load_digits), ("breast_cancer", skd.load_breast_cancer), ("wine", skd.load_wine), ("iris", skd.load_iris)],
)
def test_bundled_sets_split_and_standardise(name, loader):
    raw = loader()
    ds = load_dataset(name, seed=3, dtype=D)
    n = raw.data.shape[0]
    assert ds.n_train + ds.n_test == n and ds.n_test == round(0.25 * n)
    assert ds.num_classes == len(np.unique(raw.target)) and ds.family == "categorical"
    # undo the standardisation: every raw row appears exactly once, with its label
    back = torch.cat([ds.x_train, ds.x_test]) * ds.std + ds.mean
    ys = torch.cat([ds.y_train, ds.y_test]).numpy()
    order = np.lexsort(np.c_[back.numpy(), ys].T)
    ref = np.lexsort(np.c_[raw.data, raw.target].T)
    np.testing.assert_allclose(back.numpy()[order], raw.data[ref], atol=1e-9)
    np.testing.assert_array_equal(ys[order], raw.target[ref])
    # statistics come from the training split only
    tr = ds.x_train.numpy() * ds.std.numpy() + ds.mean.numpy()
    np.testing.assert_allclose(ds.mean.numpy(), tr.mean(0), atol=1e-9)
    varying = raw.data.std(0) > 0
    np.testing.assert_allclose(ds.x_train.numpy()[:, varying].std(0), 1.0, atol=1e-9)
    assert not np.allclose(ds.x_test.numpy()[:, varying].mean(0), 0.0, atol=1e-6)
    if name != "digits":
        assert ds.feature_names == tuple(raw.feature_names)
    # the split is fixed by the seed
    again = load_dataset(name, seed=3, dtype=D)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    other = load_dataset(name, seed=4, dtype=D)
    assert not torch.equal(other.x_train, ds.x_train)


def test_options_dtype_unstandardised_and_max_train():
    ds = load_dataset("iris", standardize=False, test_fraction=0.5, max_train=30)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.n_train == 30 and ds.n_test == 75 and ds.mean is None
    assert float(ds.x_train.min()) >= 0  # raw iris measurements are positive
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("iris", test_fraction=1.0)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="dtype"):
        load_dataset("iris", dtype=torch.int32)


@pytest.mark.parametrize("name", ["glm_teacher", "mlp_teacher"])
def test_teachers_are_seeded_and_noisy(name):
    a = load_dataset(name, n=600, num_features=4, num_classes=3, seed=1, label_noise=0.0)
    b = load_dataset(name, n=600, num_features=4, num_classes=3, seed=1, label_noise=0.0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.num_classes == 3 and a.num_features == 4 and a.info["label_noise"] == 0.0
    noisy = load_dataset(name, n=600, num_features=4, num_classes=3, seed=1, label_noise=1.0)
    counts = np.bincount(noisy.y_train.numpy(), minlength=3) / noisy.n_train
    np.testing.assert_allclose(counts, 1 / 3, atol=0.08)  # pure noise: uniform labels
    assert torch.equal(noisy.x_train, a.x_train)  # same inputs, only labels change
    # clean labels carry signal: a linear probe beats chance clearly
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=500).fit(a.x_train.numpy(), a.y_train.numpy())
    assert clf.score(a.x_test.numpy(), a.y_test.numpy()) > 0.5
    with pytest.raises(ValueError, match="label_noise"):
        load_dataset(name, label_noise=1.5)


def test_npz_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.integers(3, 6, 40)  # labels 3..5 are re-indexed to 0..2
    np.savez(tmp_path / "d.npz", X=x, y=y)
    ds = load_dataset(tmp_path / "d.npz", seed=0, dtype=D)
    assert ds.num_classes == 3 and int(ds.y_train.max()) <= 2 and ds.info["classes"] == ("3", "4", "5")
    back = torch.cat([ds.x_train, ds.x_test]) * ds.std + ds.mean
    assert np.allclose(np.sort(back.numpy(), 0), np.sort(x, 0))
    np.savez(tmp_path / "reg.npz", X=x, y=rng.normal(size=40))
    reg = load_dataset("npz", path=tmp_path / "reg.npz")
    assert reg.family == "gaussian" and reg.y_train.shape == (30, 1) and reg.num_classes is None
    np.savez(tmp_path / "nolabels.npz", X=x)
    with pytest.raises(ValueError, match="'X' and 'y'"):
        load_dataset(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "short.npz", X=x, y=y[:-1])
    with pytest.raises(ValueError, match="40 inputs but 39 labels"):
        load_dataset(tmp_path / "short.npz")
    (tmp_path / "fake.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="npz"):
        load_dataset(tmp_path / "fake.npz")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="needs path"):
        load_dataset("npz")


def test_broken_npz_files_give_one_clear_error(tmp_path):
    """Truncated, bit-flipped and random files: a ValueError naming the file and the fix, no zipfile error."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "good.npz", X=rng.normal(size=(40, 3)), y=rng.integers(0, 2, 40))
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[200] ^= 0xFF  # inside the first array's data
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    (tmp_path / "random.npz").write_bytes(rng.bytes(300))
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    for name, match in [
        ("truncated", "truncated or corrupt"),
        ("flipped", "truncated or corrupt"),
        ("random", "not an npz file"),
        ("single", "single .npy"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            load_dataset(tmp_path / f"{name}.npz")
        msg = str(info.value)
        assert "\n" not in msg and "allow_pickle" not in msg and "numpy.savez" in msg and name in msg


def test_csv_with_label_column_and_errors(tmp_path):
    lines = ["a,species,b"] + [f"{i * 0.5},{'cat' if i % 2 else 'dog'},{i * i}" for i in range(12)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "d.csv", label="species", standardize=False, seed=0, dtype=D)
    assert ds.feature_names == ("a", "b") and ds.info["classes"] == ("cat", "dog")
    x = torch.cat([ds.x_train, ds.x_test])
    y = torch.cat([ds.y_train, ds.y_test])
    for row, lab in zip(x, y):
        i = int(round(float(row[0]) * 2))
        assert float(row[1]) == i * i and int(lab) == (0 if i % 2 else 1)
    with pytest.raises(ValueError, match="no label column 'label'"):
        load_dataset(tmp_path / "d.csv")
    (tmp_path / "ragged.csv").write_text("a,label\n1,0\n2\n")
    with pytest.raises(ValueError, match="different number of fields"):
        load_dataset(tmp_path / "ragged.csv")
    (tmp_path / "text.csv").write_text("a,label\nx,0\ny,1\n")
    with pytest.raises(ValueError, match="numeric"):
        load_dataset(tmp_path / "text.csv")


def idx_bytes(code, dims, payload):
    """An IDX file written by hand (independent of write_idx): magic 0 0 code ndim, big-endian dims."""
    return bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + payload


def test_idx_reader_on_hand_written_files(tmp_path):
    imgs = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    labels = np.array([0, 1, 2, 1, 0], dtype=np.uint8)
    (tmp_path / "img-idx3-ubyte").write_bytes(idx_bytes(0x08, (5, 2, 3), imgs.tobytes()))
    (tmp_path / "lab-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(0x08, (5,), labels.tobytes())))
    np.testing.assert_array_equal(read_idx(tmp_path / "img-idx3-ubyte"), imgs)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab-idx1-ubyte.gz"), labels)
    floats = np.array([[1.5, -2.0]], dtype=">f4")
    (tmp_path / "f-idx2-ubyte").write_bytes(idx_bytes(0x0D, (1, 2), floats.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "f-idx2-ubyte"), [[1.5, -2.0]])
    ints = np.array([70000, -3], dtype=">i4")
    (tmp_path / "i-idx1-ubyte").write_bytes(idx_bytes(0x0C, (2,), ints.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "i-idx1-ubyte"), [70000, -3])
    # write_idx is the inverse of read_idx
    write_idx(tmp_path / "w-idx3-ubyte.gz", imgs, compress=True)
    assert (tmp_path / "w-idx3-ubyte.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(tmp_path / "w-idx3-ubyte.gz"), imgs)
    with pytest.raises(ValueError, match="IDX stores arrays of 1 to 255 dimensions, got a 0-d array"):
        write_idx(tmp_path / "s-idx0-ubyte", np.uint8(7))  # wrote a file read_idx refuses before
    assert not (tmp_path / "s-idx0-ubyte").exists()

    ds = load_dataset(
        "idx",
        path=tmp_path / "img-idx3-ubyte",
        labels=tmp_path / "lab-idx1-ubyte.gz",
        test_fraction=0.4,
        standardize=False,
        seed=0,
    )
    assert ds.num_features == 6 and ds.n_train == 3 and ds.n_test == 2
    for row, lab in zip(torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test])):
        i = int(row[0]) // 6
        assert torch.equal(row, torch.tensor(imgs[i].reshape(-1), dtype=torch.float32)) and int(lab) == labels[i]

    bad = {
        "magic": b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00",
        "code": idx_bytes(0x07, (1,), b"\x00"),
        "trunc": idx_bytes(0x08, (4,), b"\x00\x00"),
        "short": b"\x00\x00",
    }
    msgs = {"magic": "two zero bytes", "code": "unknown IDX data type", "trunc": "declares shape", "short": "too short"}
    for key, blob in bad.items():
        (tmp_path / f"{key}-idx1-ubyte").write_bytes(blob)
        with pytest.raises(ValueError, match=msgs[key]):
            read_idx(tmp_path / f"{key}-idx1-ubyte")
    (tmp_path / "l4-idx1-ubyte").write_bytes(idx_bytes(0x08, (4,), bytes(4)))
    with pytest.raises(ValueError, match="5 inputs but 4 labels"):
        load_dataset("idx", path=tmp_path / "img-idx3-ubyte", labels=tmp_path / "l4-idx1-ubyte")
    with pytest.raises(ValueError, match="labels="):
        load_dataset(tmp_path / "img-idx3-ubyte")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing-idx1-ubyte")


def test_mnist_directory_keeps_its_split(tmp_path):
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 256, (8, 4, 4), dtype=np.uint8), rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    ytr, yte = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.uint8), np.array([3, 2, 1], np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(8, tr.shape, tr.tobytes())))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(8, ytr.shape, ytr.tobytes()))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(8, te.shape, te.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(8, yte.shape, yte.tobytes()))
    ds = load_dataset("mnist", path=tmp_path, standardize=False)
    assert ds.n_train == 8 and ds.n_test == 3 and ds.num_classes == 4
    np.testing.assert_array_equal(ds.x_test.numpy(), te.reshape(3, -1))
    np.testing.assert_array_equal(ds.y_train.numpy(), ytr)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        load_dataset("mnist", path=tmp_path)


# --------------------------------------------------------------------------- Fashion-MNIST (Debian package)
def test_fashion_mnist_missing_fails_at_once_with_the_install_line(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion_mnist", path=tmp_path)
    msg = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "\n" not in msg


def test_fashion_mnist_small_slice():
    import os

    from dropgeom.data import FASHION_MNIST_DIR

    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)")
    ds = load_dataset("fashion_mnist", max_train=64, seed=0)
    assert ds.x_train.shape == (64, 784) and ds.x_test.shape == (10000, 784)
    assert ds.num_classes == 10 and ds.family == "categorical"
    assert set(ds.y_test.unique().tolist()) == set(range(10))
    assert ds.name == "fashion_mnist" and ds.info["directory"] == FASHION_MNIST_DIR  # was the folder's path


def test_fashion_mnist_from_another_folder_keeps_its_name(tmp_path):
    for part, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2), compress=True)
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 2, compress=True)
    ds = load_dataset("fashion_mnist", path=tmp_path)
    assert (ds.name, ds.n_train, ds.n_test, ds.info["directory"]) == ("fashion_mnist", 6, 4, str(tmp_path))
    assert load_dataset(tmp_path).name == str(tmp_path)  # a plain MNIST folder is still named by its path
