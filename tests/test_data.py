"""Tests for localnet.data, against the real data in ../shared/data (or $LOCALNET_DATA)
and against small trees built here. Checks compare with independent truth (torchvision,
PIL, brute-force search), not with the module's own helpers."""

import io
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from localnet import data as D
from localnet.data import DatasetError, DatasetNotFoundError, load_data

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def data_root():
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    root = Path(os.environ.get("LOCALNET_DATA", default))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {root}; set LOCALNET_DATA")
    return root


@pytest.fixture(scope="module")
def cifar(data_root, tmp_path_factory):
    """Decode the CIFAR-10 tar once for this module (a few seconds) into a fresh cache,
    then load again from that cache; yields both bundles and the timings."""
    if not (data_root / "cifar10-jpeg.tar").is_file():
        pytest.skip("cifar10-jpeg.tar not found")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALNET_CACHE", str(cache))
        t0 = time.perf_counter()
        first = load_data("cifar10", root=str(data_root))
        t1 = time.perf_counter()
        second = load_data("cifar10", root=str(data_root))
        t2 = time.perf_counter()
        print(f"\ncifar10: first load (decode) {t1 - t0:.1f}s, cached reload {t2 - t1:.2f}s")
        yield dict(first=first, second=second, decode_s=t1 - t0, reload_s=t2 - t1, cache=cache)


def unnormalise_cifar(x):
    return ((x * CIFAR_STD + CIFAR_MEAN) * 255).round().clamp(0, 255).to(torch.uint8)


# -----------------------------------------------------------------------------
# MNIST / Fashion-MNIST

def test_mnist_matches_torchvision(data_root):
    b = load_data("mnist", root=str(data_root))
    assert (len(b.train), len(b.test)) == (60000, 10000)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10 and b.name == "mnist"
    tv = torchvision.datasets.MNIST(str(data_root), train=True, download=False)
    img, label = tv[0]
    x, y = b.train[0]
    assert y.item() == label == 5  # the famous first MNIST digit
    expected = (torch.from_numpy(np.array(img)).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0], expected, atol=1e-5)
    assert x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert abs(b.train.x.mean().item()) < 0.01 and abs(b.train.x.std().item() - 1) < 0.01


def test_fashion_mnist(data_root):
    b = load_data("fashion-mnist", root=str(data_root), test_subset=1000)
    assert (len(b.train), len(b.test)) == (60000, 1000)
    assert abs(b.train.x.mean().item()) < 0.01
    assert torch.equal(b.train.y.bincount(), torch.full((10,), 6000))


def test_loader_fetches_whole_batches(data_root, monkeypatch):
    b = load_data("mnist", root=str(data_root), subset=1000)
    calls = []
    orig = D.TensorImageDataset.__getitems__
    monkeypatch.setattr(D.TensorImageDataset, "__getitems__",
                        lambda self, idx: calls.append(len(idx)) or orig(self, idx))
    batches = list(b.train_loader(batch_size=128, seed=0, epoch=0))
    assert calls == [128] * 7  # one call per batch, last partial batch dropped
    assert all(x.shape == (128, 1, 28, 28) and y.shape == (128,) for x, y in batches)
    # the test loader is in order and keeps the last partial batch
    tb = list(b.test_loader(batch_size=4096))
    assert [len(y) for _, y in tb] == [4096, 4096, 1808]
    assert torch.equal(torch.cat([x for x, _ in tb]), b.test.x)


def test_shuffle_is_deterministic(data_root):
    b = load_data("mnist", root=str(data_root), subset=512)
    order = lambda seed, epoch: torch.cat([y for _, y in b.train_loader(64, seed, epoch)])
    first = lambda seed, epoch: next(iter(b.train_loader(64, seed, epoch)))[0]
    assert torch.equal(first(1, 3), first(1, 3))
    assert not torch.equal(first(1, 3), first(1, 4))
    assert not torch.equal(first(1, 3), first(2, 3))
    assert torch.equal(order(0, 0).sort().values, b.train.y.sort().values)  # a permutation


def test_subset_takes_first_samples(data_root):
    full = load_data("mnist", root=str(data_root))
    sub = load_data("mnist", root=str(data_root), subset=100, test_subset=50)
    assert (len(sub.train), len(sub.test)) == (100, 50)
    assert torch.equal(sub.train.x, full.train.x[:100]) and torch.equal(sub.train.y, full.train.y[:100])
    assert torch.equal(sub.test.y, full.test.y[:50])


# -----------------------------------------------------------------------------
# CIFAR-10 from the JPEG tar

def test_cifar_from_tar(cifar, data_root):
    b = cifar["first"]
    assert (len(b.train), len(b.test)) == (50000, 10000)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert b.classes == ["airplane", "automobile", "bird", "cat", "deer",
                         "dog", "frog", "horse", "ship", "truck"]
    assert torch.equal(b.train.y.bincount(), torch.full((10,), 5000))
    assert torch.equal(b.test.y.bincount(), torch.full((10,), 1000))
    assert b.train.x.shape == (50000, 3, 32, 32) and b.train.x.dtype == torch.uint8
    # samples interleave classes, so any prefix (subset=N) is class balanced
    assert b.train.y[:20].tolist() == list(range(10)) * 2
    # sample 11 is automobile/0001.jpg: decode it independently with PIL
    with tarfile.open(data_root / "cifar10-jpeg.tar") as tf:
        img = Image.open(io.BytesIO(tf.extractfile("train/automobile/0001.jpg").read())).convert("RGB")
    truth = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert (b.train.x[11].int() - truth.int()).abs().max() <= 1
    # the test set fetches normalised, unaugmented floats
    x, y = b.test_loader(batch_size=10000).__iter__().__next__()
    assert torch.equal(unnormalise_cifar(x), b.test.x)
    assert x.mean().abs() < 0.05 and (x.std() - 1).abs() < 0.05


def test_cifar_cache(cifar):
    assert cifar["reload_s"] < 3.0, cifar
    assert len(list(cifar["cache"].glob("cifar10-*.pt"))) == 1
    a, b = cifar["first"], cifar["second"]
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)


def find_shift_flip(aug, orig, pad=4):
    """Brute force: which (dy, dx, flip) turns orig (C,H,W, uint8) into aug, padding with zeros."""
    C, H, W = orig.shape
    padded = torch.zeros(C, H + 2 * pad, W + 2 * pad, dtype=orig.dtype)
    padded[:, pad:pad + H, pad:pad + W] = orig
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + H, dx:dx + W]
            for flip in (False, True):
                if torch.equal(aug, crop.flip(-1) if flip else crop):
                    hits.append((dy - pad, dx - pad, flip))
    return hits


def test_cifar_augmentation(cifar, data_root):
    b = cifar["first"]
    x, y = next(iter(b.train_loader(batch_size=64, seed=7, epoch=0)))
    x2, y2 = next(iter(b.train_loader(batch_size=64, seed=7, epoch=0)))
    x3, y3 = next(iter(b.train_loader(batch_size=64, seed=7, epoch=1)))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    # an unaugmented load shuffles identically, so it tells us each sample's original
    plain = load_data("cifar10", root=str(data_root), augment=False)  # from the cache
    xp, yp = next(iter(plain.train_loader(batch_size=64, seed=7, epoch=0)))
    assert torch.equal(y, yp)
    orig = unnormalise_cifar(xp)
    for i in range(16):  # ... and those are real training images of that label
        assert (b.train.x[b.train.y == y[i]] == orig[i]).flatten(1).all(1).any()
    aug = unnormalise_cifar(x)
    shifts, flips = set(), set()
    for i in range(64):
        hits = find_shift_flip(aug[i], orig[i])
        assert hits, f"sample {i} is not a shifted/flipped copy of its original"
        shifts.update((dy, dx) for dy, dx, _ in hits)
        flips.update(f for _, _, f in hits)
    assert flips == {False, True} and len(shifts) > 10  # it really does augment


# -----------------------------------------------------------------------------
# CIFAR-10 from a small folder tree and a tar of it (lossless PNGs, so exact)

def save_png(img, path):
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def make_tree(root: Path, n_train=3, n_test=2):
    g = torch.Generator().manual_seed(0)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("dog", "cat"):  # written unsorted on purpose
            (root / split / cls).mkdir(parents=True)
            for k in range(n):
                img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
                save_png(img, root / split / cls / f"{k:04d}.png")
                truth[(split, cls, k)] = img
    return truth


def test_cifar_folder_and_tar(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALNET_CACHE", str(tmp_path / "cache"))
    truth = make_tree(tmp_path / "a" / "cifar10")
    b = load_data("cifar10", root=str(tmp_path / "a"))
    assert b.classes == ["cat", "dog"] and b.num_classes == 2
    assert b.train.y.tolist() == [0, 1, 0, 1, 0, 1]  # interleaved: k-th of each class in turn
    assert torch.equal(b.train.x[0], truth[("train", "cat", 0)])
    assert torch.equal(b.train.x[3], truth[("train", "dog", 1)])
    assert torch.equal(b.test.x[1], truth[("test", "dog", 0)])
    # the same tree as a tar, with a top-level folder inside
    with tarfile.open(tmp_path / "b.tar", "w") as tf:
        tf.add(tmp_path / "a" / "cifar10", arcname="cifar10-jpeg")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cifar10.tar").symlink_to(tmp_path / "b.tar")
    t = load_data("cifar10", root=str(tmp_path / "c"))
    assert torch.equal(t.train.x, b.train.x) and torch.equal(t.test.y, b.test.y)
    # a second load reads the cache and decodes nothing
    monkeypatch.setattr(D, "_decode_tree", lambda src: pytest.fail("decoded again"))
    again = load_data("cifar10", root=str(tmp_path / "c"))
    assert torch.equal(again.train.x, b.train.x)


def test_a_cache_cut_short_is_decoded_again(tmp_path, monkeypatch, capsys):
    """The cache holds nothing its source does not: a cache file cut short (a disk that
    filled) costs a note and a decode, not the run."""
    monkeypatch.setenv("LOCALNET_CACHE", str(tmp_path / "cache"))
    truth = make_tree(tmp_path / "a" / "cifar10")
    load_data("cifar10", root=str(tmp_path / "a"))
    [cache] = (tmp_path / "cache").glob("cifar10-*.pt")
    cache.write_bytes(cache.read_bytes()[:200])
    b = load_data("cifar10", root=str(tmp_path / "a"))
    assert torch.equal(b.train.x[0], truth[("train", "cat", 0)])
    assert f"decoded CIFAR-10 cache {cache} cannot be read" in capsys.readouterr().err
    monkeypatch.setattr(D, "_decode_tree", lambda src: pytest.fail("decoded again"))
    assert torch.equal(load_data("cifar10", root=str(tmp_path / "a")).train.x, b.train.x)


def test_a_cache_that_cannot_be_written_costs_a_note_not_the_run(tmp_path, monkeypatch,
                                                                  capsys):
    """The images are decoded either way: a cache folder that cannot be made is one line
    naming it and $LOCALNET_CACHE, and the data is the same."""
    (tmp_path / "not-a-dir").write_text("a file where the cache folder would go")
    monkeypatch.setenv("LOCALNET_CACHE", str(tmp_path / "not-a-dir"))
    truth = make_tree(tmp_path / "a" / "cifar10")
    b = load_data("cifar10", root=str(tmp_path / "a"))
    assert torch.equal(b.train.x[0], truth[("train", "cat", 0)])
    err = capsys.readouterr().err
    assert f"localnet: cannot cache the decoded CIFAR-10 at {tmp_path / 'not-a-dir'}/cifar10-" \
        in err and "$LOCALNET_CACHE names a writable folder" in err


# -----------------------------------------------------------------------------
# errors and paths

def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_data("mnist", root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "LOCALNET_DATA" in msg and "download" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError) as e:
        load_data("cifar10", root=str(tmp_path))
    msg = str(e.value)
    for p in ("cifar-10-batches-py", "cifar10-jpeg.tar", "cifar10.tar", str(tmp_path / "cifar10" / "train")):
        assert p in msg
    assert "data.download=true" in msg
    with pytest.raises(DatasetNotFoundError, match="val") as e:
        load_data("imagefolder", root=str(tmp_path))
    # one's own images: no download to offer
    assert "data.download" not in str(e.value) and "nothing to download" in str(e.value)


def test_find_data_says_where_each_dataset_is_without_reading_it(tmp_path, monkeypatch):
    """What `validate` asks: the same places load_data reads, the same error when
    absent, and nothing decoded."""
    from localnet.data import find_data

    monkeypatch.setattr(D, "_decode_tree", lambda src: pytest.fail("decoded"))
    for name, where in (("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"),
                        ("cifar10", "cifar10.tar"), ("imagefolder", "train")):
        with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / where))):
            find_data(name, str(tmp_path))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in D._MNIST_FILES[:3]:
        (raw / f).write_bytes(b"")
    with pytest.raises(DatasetNotFoundError):  # all four, or torchvision would not load it
        find_data("mnist", str(tmp_path))
    (raw / D._MNIST_FILES[3]).write_bytes(b"")
    assert find_data("mnist", str(tmp_path)) == raw
    (tmp_path / "cifar10-jpeg.tar").write_bytes(b"")
    assert find_data("cifar10", str(tmp_path)) == tmp_path / "cifar10-jpeg.tar"
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert find_data("imagefolder", str(tmp_path)) == tmp_path
    assert find_data("synthetic", str(tmp_path)) is None
    monkeypatch.setenv("LOCALNET_DATA", str(tmp_path))
    assert find_data("mnist") == raw  # the root from the environment, as load_data takes it


def test_unusable_data_names_the_file(tmp_path, monkeypatch):
    """Data that is there but cannot be used is a DatasetError naming the culprit."""
    monkeypatch.setenv("LOCALNET_CACHE", str(tmp_path / "cache"))
    make_tree(tmp_path / "odd" / "cifar10")
    Image.new("RGB", (30, 32)).save(tmp_path / "odd" / "cifar10" / "train" / "cat" / "9.png")
    with pytest.raises(DatasetError, match=r"train images of 30x32, 32x32 \(train/cat/9.png is one"):
        load_data("cifar10", root=str(tmp_path / "odd"))
    make_tree(tmp_path / "junk" / "cifar10")
    (tmp_path / "junk" / "cifar10" / "test" / "dog" / "x.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="test/dog/x.png is not an image"):
        load_data("cifar10", root=str(tmp_path / "junk"))
    with tarfile.open(tmp_path / "cifar10.tar", "w") as tf:  # a tar without test images
        tf.add(tmp_path / "odd" / "cifar10" / "train" / "dog", arcname="train/dog")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "cifar10.tar").symlink_to(tmp_path / "cifar10.tar")
    with pytest.raises(DatasetError, match="no test images"):
        load_data("cifar10", root=str(tmp_path / "t"))
    for split, cls in (("train", "ant"), ("val", "bee")):
        (tmp_path / "f" / split / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "f" / split / cls / "0.png")
    with pytest.raises(DatasetError, match="different class folders .ant, bee in only one"):
        load_data("imagefolder", root=str(tmp_path / "f"))
    (tmp_path / "f" / "val" / "ant").mkdir()  # a class folder with no image in it
    with pytest.raises(DatasetError, match=str(tmp_path / "f")):
        load_data("imagefolder", root=str(tmp_path / "f"))


def test_a_subset_beyond_the_data_is_all_of_it_with_a_note(data_root, capsys):
    """A run's figures would count fewer samples than its config asks for, silently."""
    b = load_data("mnist", root=str(data_root), subset=70_000, test_subset=500)
    assert (len(b.train), len(b.test)) == (60_000, 500)
    assert capsys.readouterr().err == ("localnet: note: data.subset: 70,000 is more than "
                                       "mnist's 60,000 training samples; all 60,000 are used\n")
    load_data("synthetic", subset=2000, test_subset=1500)  # draws as many as asked
    assert capsys.readouterr().err == ""


def test_mnist_file_cut_short_is_named(data_root, tmp_path):
    """A copy that stopped part-way is there, so it is named, not called missing."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    real = (data_root / "MNIST" / "raw").resolve()  # a link's target is taken from its folder
    for f in D._MNIST_FILES:
        (raw / f).symlink_to(real / f)
    (raw / "train-images-idx3-ubyte").unlink()
    whole = (real / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(whole[:100_000])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte is 100,000 bytes, but its "
                                           r"header says 47,040,016 \(cut short\)"):
        load_data("mnist", root=str(tmp_path))
    (raw / "train-images-idx3-ubyte").write_bytes(b"<html>404</html>" + whole[16:])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte is not an idx file"):
        load_data("mnist", root=str(tmp_path))


def test_cifar_tar_cut_short_is_named(tmp_path, monkeypatch):
    """tarfile ends its loop quietly at a header cut short: a copy that stopped part-way
    must not train on the part it holds (a test class without train images was a crash)."""
    monkeypatch.setenv("LOCALNET_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "a" / "cifar10"
    make_tree(tree)
    with tarfile.open(tmp_path / "whole.tar", "w") as tf:  # test/ first, as the shared copy
        for split in ("test", "train"):
            tf.add(tree / split, arcname=split)
    whole = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tf:
        members = tf.getmembers()
    cut = next(m for m in members if m.name.startswith("train/dog/")).offset  # at a header
    inside = members[-1].offset_data + 100  # inside the last image's bytes
    for n, why in ((cut, f"it stops at byte {cut:,} with no end-of-archive blocks"),
                   (inside, "unexpected end of data"), (0, "empty file")):
        d = tmp_path / f"cut{n}"
        d.mkdir()
        (d / "cifar10.tar").write_bytes(whole[:n])
        with pytest.raises(DatasetError, match=re.escape("cifar10.tar is cut short or not a "
                                                         "tar") + ".*" + re.escape(why)):
            load_data("cifar10", root=str(d))
    (d / "cifar10.tar").write_bytes(whole)  # the whole copy loads
    assert load_data("cifar10", root=str(d)).train.y.tolist() == [0, 1, 0, 1, 0, 1]
    shutil.rmtree(tree / "train" / "dog")
    with pytest.raises(DatasetError, match=r"test images of classes with no train images \(dog\)"):
        load_data("cifar10", root=str(tmp_path / "a"))


def test_unknown_name():
    with pytest.raises(ValueError, match="mnist.*cifar10.*synthetic"):
        load_data("imagenet21k")


def test_root_and_cache_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("LOCALNET_DATA", raising=False)
    monkeypatch.delenv("LOCALNET_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.resolve_root(None) == tmp_path / "xdg" / "localnet" / "data"
    assert D.cache_dir() == tmp_path / "xdg" / "localnet"
    monkeypatch.setenv("LOCALNET_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("LOCALNET_CACHE", str(tmp_path / "c"))
    assert D.resolve_root(None) == tmp_path / "env"
    assert D.resolve_root(str(tmp_path / "cfg")) == tmp_path / "cfg"  # config wins
    assert D.cache_dir() == tmp_path / "c"


# -----------------------------------------------------------------------------
# synthetic and imagefolder

def test_synthetic_deterministic_and_learnable():
    a = load_data("synthetic", seed=3)
    b = load_data("synthetic", seed=3)
    c = load_data("synthetic", seed=4)
    assert (len(a.train), len(a.test)) == (512, 256) and a.input_shape == (3, 32, 32)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    m = load_data("synthetic", synthetic_shape=(1, 28, 28), synthetic_size=1000)
    assert m.train.x.shape == (1000, 1, 28, 28) and m.input_shape == (1, 28, 28)
    assert torch.equal(m.train.y.bincount(), torch.full((10,), 100))
    # learnable: nearest class mean (fit on train) classifies the test set well
    means = torch.stack([m.train.x[m.train.y == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(m.test.x.flatten(1), means).argmin(1)
    assert (pred == m.test.y).float().mean() > 0.9


def test_synthetic_draws_as_many_as_a_larger_subset_asks_and_keeps_smaller_ones():
    """data.subset beyond the default 512 gets that many images (a benchmark where no
    dataset is), test_subset likewise; a smaller subset is the default set's first N."""
    full = load_data("synthetic", seed=1)
    big = load_data("synthetic", seed=1, subset=1500, test_subset=900)
    assert (len(big.train), len(big.test)) == (1500, 900)
    assert torch.equal(big.train.y.bincount(), torch.full((10,), 150))
    small = load_data("synthetic", seed=1, subset=100, test_subset=50)
    assert torch.equal(small.train.x, full.train.x[:100])
    assert torch.equal(small.test.y, full.test.y[:50])


def test_synthetic_that_cannot_fit_is_named_before_it_is_drawn(monkeypatch):
    """Its images are held whole: 10,000 of 3x32x32 are 123 MB as float32 (and more while
    drawn), which a machine with 100 MB free cannot take; torch's allocator would fail
    with a byte count and no key."""
    monkeypatch.setattr(D, "_available_bytes", lambda: 100 * 2**20)
    monkeypatch.setattr(D, "_synthetic", lambda *a, **k: pytest.fail("drawn"))
    with pytest.raises(DatasetError, match=r"data.subset / data.test_subset: 10,000 synthetic "
                                           r"training and 5,000 test images of 3x32x32 take "
                                           r"about 0.5 GiB while drawn, and this machine has "
                                           r"0.1 GiB free"):
        load_data("synthetic", subset=10_000)
    monkeypatch.undo()
    assert D._available_bytes() > 2**20  # this machine's, read from /proc/meminfo
    assert len(load_data("synthetic", subset=1000).train) == 1000


def test_imagefolder(tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, cls in [(s, c) for s in ("train", "val") for c in ("ant", "bee", "cow")]:
        (tmp_path / split / cls).mkdir(parents=True)
        for k in range(2):
            img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g)
            save_png(img, tmp_path / split / cls / f"{k}.png")
    b = load_data("imagefolder", root=str(tmp_path), image_size=16)
    assert b.num_classes == 3 and b.input_shape == (3, 16, 16) and len(b.train) == 6
    x, y = next(iter(b.train_loader(batch_size=4, seed=0, epoch=0)))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    x2, _ = next(iter(b.train_loader(batch_size=4, seed=0, epoch=0)))
    x3, _ = next(iter(b.train_loader(batch_size=4, seed=0, epoch=1)))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    xt, yt = next(iter(b.test_loader(batch_size=6)))
    assert xt.shape == (6, 3, 16, 16) and yt.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(load_data("imagefolder", root=str(tmp_path), image_size=16, subset=2).train) == 2
