"""
Datasets for localnet: MNIST, Fashion-MNIST, CIFAR-10, generic image folders, and a
synthetic problem for tests.

Small datasets live in memory as one tensor each and are fetched a whole batch at a
time (Dataset.__getitems__): an MNIST MLP step is so short that per-sample fetching
plus collation would dominate the run. Shuffling and augmentation are drawn from a
generator seeded by (seed, epoch), so a run is reproducible and a resumed run sees
the same batches as an uninterrupted one.
"""

import copy
import hashlib
import io
import math
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .files import CheckpointError, UnwritableError, load_state, save_state

DATASETS = ("mnist", "fashion_mnist", "cifar10", "imagefolder", "synthetic")

# per-channel statistics of the training sets, on the [0, 1] pixel scale
MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DatasetNotFoundError(FileNotFoundError):
    """The data is not where we looked; the message says where we looked and what to do."""


class DatasetError(ValueError):
    """The data is there but unusable (an image that does not decode, images of different
    sizes, splits with different classes); the message names the file or folder."""


# -----------------------------------------------------------------------------
# where things live

def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localnet"


def resolve_root(root: str | None) -> Path:
    """Data root: the config value, else $LOCALNET_DATA, else ~/.cache/localnet/data."""
    root = root or os.environ.get("LOCALNET_DATA") or _user_cache() / "data"
    return Path(root).expanduser()


def cache_dir() -> Path:
    """Where decoded tensors are cached: $LOCALNET_CACHE, else ~/.cache/localnet."""
    env = os.environ.get("LOCALNET_CACHE")
    return Path(env).expanduser() if env else _user_cache()


def _how_to_get(name: str, looked: list[Path], layout: str,
                downloads: bool = True) -> DatasetNotFoundError:
    where = "\n".join(f"  - {p}" for p in looked)
    env = os.environ.get("LOCALNET_DATA")
    return DatasetNotFoundError(
        f"dataset '{name}' not found. Looked at:\n{where}\n"
        f"($LOCALNET_DATA is {'set to ' + env if env else 'not set'}.) To fix: point data.root "
        f"(or $LOCALNET_DATA) at a folder holding {layout}"
        + ("; or set data.download=true when a network is available." if downloads else
           " (your own images: there is nothing to download).")
    )


# -----------------------------------------------------------------------------
# in-memory datasets with batched fetch

def _generator(seed: int, *more: int) -> torch.Generator:
    # mix the integers into one 63-bit seed; distinct (seed, epoch) pairs get distinct streams
    h = hashlib.sha256(repr((seed, *more)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)


def crop_flip(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop (zero padding) + horizontal flip of a batch, without a loop.
    x: (B,C,H,W); shift: (B,2) top-left offsets in [0, 2*pad]; flip: (B,) bool."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # zeros = black pixels, as torchvision's RandomCrop(padding=4)
    rows = shift[:, 0:1] + torch.arange(H)  # (B,H) source rows of each crop
    cols = shift[:, 1:2] + torch.arange(W)  # (B,W) source columns
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip just reads the columns backwards
    out = xp[torch.arange(B)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B,H,W,C)
    return out.permute(0, 3, 1, 2).contiguous()


class TensorImageDataset(Dataset):
    """Images x (N,C,H,W) and int64 labels y (N,) held in memory.
    x is either float and already normalised (MNIST, synthetic), or uint8 and normalised
    on fetch with mean/std (CIFAR: 4x less memory, and augmentation pads with black pixels).
    __getitems__ returns a ready batch (x, y); use collate_fn=passthrough in a DataLoader."""

    def __init__(self, x, y, mean=None, std=None, augment=False):
        assert len(x) == len(y)
        self.x, self.y, self.augment = x, y, augment
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)
        self.aug = None  # per-sample (shift, flip) drawn for one epoch, see for_epoch

    def __len__(self):
        return len(self.y)

    def for_epoch(self, g: torch.Generator) -> "TensorImageDataset":
        """A shallow copy whose augmentation for every sample is drawn now from g.
        Drawing per sample (not per batch) makes it independent of batch order and workers."""
        view = copy.copy(self)
        if self.augment:
            n = len(self)
            # crop offsets in [0, 8] of the 4-padded image, and a coin flip for mirroring
            view.aug = (torch.randint(0, 9, (n, 2), generator=g), torch.rand(n, generator=g) < 0.5)
        return view

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        x, y = self.x[idx], self.y[idx]
        if self.aug is not None:
            x = crop_flip(x, self.aug[0][idx], self.aug[1][idx])
        if self.mean is not None:
            x = (x.float() / 255 - self.mean) / self.std
        return x, y

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]


def passthrough(batch):
    # __getitems__ already returned the collated (x, y)
    return batch


# -----------------------------------------------------------------------------
# the bundle handed to training code

@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    classes: list[str] | None = field(default=None, repr=False)

    def train_loader(self, batch_size: int, seed: int, epoch: int, drop_last: bool = True,
                     pin_memory: bool = False) -> DataLoader:
        """Shuffled, and augmented if the dataset augments, both determined by (seed, epoch).
        pin_memory: batches in page-locked memory, so a GPU copies each one in a single
        asynchronous transfer."""
        g = _generator(seed, epoch)
        order = torch.randperm(len(self.train), generator=g).tolist()
        ds = self.train.for_epoch(g) if hasattr(self.train, "for_epoch") else self.train
        return DataLoader(ds, batch_size=batch_size, sampler=order, drop_last=drop_last,
                          collate_fn=_collate_for(ds), pin_memory=pin_memory)

    def test_loader(self, batch_size: int, pin_memory: bool = False) -> DataLoader:
        return DataLoader(self.test, batch_size=batch_size, shuffle=False,
                          collate_fn=_collate_for(self.test), pin_memory=pin_memory)


def _collate_for(ds):
    return passthrough if hasattr(ds, "__getitems__") else None  # None = torch's default collate


# -----------------------------------------------------------------------------
# MNIST / Fashion-MNIST

_MNIST_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


def _mnist_source(name, root, download) -> Path:
    raw = root / _MNIST_DIRS[name] / "raw"
    legacy = root / _MNIST_DIRS[name] / "processed" / "training.pt"  # torchvision still reads it
    if not download and not legacy.is_file() and not all((raw / f).is_file() for f in _MNIST_FILES):
        raise _how_to_get(name, [raw], f"{_MNIST_DIRS[name]}/raw/ with the four uncompressed "
                                       f"idx files (train-images-idx3-ubyte, ...)")
    return raw


def _idx_defect(path: Path) -> str | None:
    """What is wrong with an idx file (LeCun's MNIST format: a 4-byte magic whose last
    byte is the number of dimensions, a big-endian uint32 per dimension, then uint8
    data), or None for a whole one or one that is not there."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        ndim = head[3] if len(head) == 4 and head[:3] == b"\0\0\x08" else None
        dims = f.read(4 * ndim) if ndim else b""
    if ndim is None or len(dims) < 4 * ndim:
        return f"{path} is not an idx file of uint8 (its first bytes are not an idx header)"
    want = 4 + len(dims) + math.prod(int.from_bytes(dims[i:i + 4], "big")
                                     for i in range(0, len(dims), 4))
    if size != want:
        return (f"{path} is {size:,} bytes, but its header says {want:,} "
                f"({'cut short' if size < want else 'with bytes after its data'})")
    return None


def _load_mnist(name, root, download):
    import torchvision
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    raw = _mnist_source(name, root, download)
    # A file cut short (a copy that stopped) or not idx at all (an HTML error page saved
    # under its name) is there: torchvision would fail on it with a bare reshape or assert
    bad = next(filter(None, map(_idx_defect, (raw / f for f in _MNIST_FILES))), None)
    if bad:
        raise DatasetError(f"{bad}; replace it with a whole copy")
    try:
        splits = [cls(str(root), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:  # torchvision's "Dataset not found" (a download that failed)
        raise _how_to_get(name, [raw], f"{cls.__name__}/raw/ with the four uncompressed idx "
                                       f"files (train-images-idx3-ubyte, ...)") from e
    mean, std = MEAN_STD[name]
    # normalise once up front: the whole set is ~190 MB as float and batches are then plain slices
    out = [TensorImageDataset(((s.data.float() / 255 - mean[0]) / std[0]).unsqueeze(1), s.targets.long())
           for s in splits]
    return out[0], out[1], splits[0].classes


# -----------------------------------------------------------------------------
# CIFAR-10

def _fingerprint(path: Path) -> str:
    # a tar changes size/mtime when rewritten; a folder tree's class dirs change mtime
    # when files are added or removed
    paths = [path] if path.is_file() else sorted(p for p in path.glob("*/*") if p.is_dir())
    stats = [(str(p), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(repr(("v1", str(path.resolve()), stats)).encode()).hexdigest()[:16]


def _split_class(parts):
    # ".../train/<class>/<file>" -> ("train", "<class>"), else None; tolerates a top-level prefix
    if len(parts) >= 3 and parts[-3] in ("train", "test") and parts[-1].lower().endswith(IMAGE_EXTS):
        return parts[-3], parts[-2]
    return None


def _image_files(src: Path):
    """Yield (split, class, filename, bytes) for every image in a folder tree or a tar."""
    if src.is_dir():
        for split in ("train", "test"):
            for f in sorted((src / split).glob("*/*")):
                if f.suffix.lower() in IMAGE_EXTS:
                    yield split, f.parent.name, f.name, f.read_bytes()
    else:
        last = None
        try:
            with tarfile.open(src) as tf:  # read members in place: no extraction to disk
                for m in tf:
                    sc = _split_class(m.name.split("/")) if m.isfile() else None
                    if sc:
                        yield *sc, m.name.rsplit("/", 1)[1], tf.extractfile(m).read()
                    last = m.name
                # tarfile ends its loop quietly at a header cut short: a tar whose copy stopped
                # part-way would give a partial dataset.  A whole tar ends in two zero blocks.
                if (size := src.stat().st_size) - tf.offset < 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"it stops at byte {size:,} with no "
                                            f"end-of-archive blocks")
        except tarfile.TarError as e:  # a tar cut inside a member, or no tar at all
            why = str(e).splitlines()[-1].strip("- ")  # open's error lists each method tried
            where = f"after {last}" if last else "at its start"
            raise DatasetError(f"{src} is cut short or not a tar ({why}; {where}): "
                               f"replace it with a whole copy") from None


def _decode_tree(src: Path) -> dict:
    # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29
    import numpy as np
    from PIL import Image
    items = {"train": [], "test": []}
    for split, cls, fname, data in _image_files(src):
        try:
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # (H,W,3) uint8
        except (OSError, SyntaxError):  # PIL's errors for a truncated or foreign file
            raise DatasetError(f"{src}: {split}/{cls}/{fname} is not an image PIL can read; "
                               f"remove or replace it") from None
        items[split].append((cls, fname, img))
    classes = sorted({c for c, _, _ in items["train"]})  # same class indices as ImageFolder
    if extra := sorted({c for c, _, _ in items["test"]} - set(classes)):
        raise DatasetError(f"{src}: test images of classes with no train images ("
                           f"{', '.join(extra)}): the model could never predict them")
    index = {c: i for i, c in enumerate(classes)}
    out = {"classes": classes}
    for split, its in items.items():
        # order: the 1st file of every class, then the 2nd, ... so that the first N samples
        # (subset=N) are class balanced; ImageFolder's class-major order would give N airplanes
        its.sort(key=lambda t: t[:2])
        ranked = [(k, index[c], img) for c, group in groupby(its, key=lambda t: t[0])
                  for k, (_, _, img) in enumerate(group)]
        ranked.sort(key=lambda t: t[:2])
        if not ranked:
            raise DatasetError(f"{src}: no {split} images (expected {split}/<class>/*.jpg "
                               f"or *.png)")
        sizes = {im.shape[:2] for _, _, im in ranked}
        if sizes != {(32, 32)}:  # the models are built for CIFAR's 32x32
            odd = next(f"{split}/{c}/{f}" for c, f, im in its if im.shape[:2] != (32, 32))
            seen = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
            raise DatasetError(f"{src}: {split} images of {seen} ({odd} is one); expected "
                               f"all 32x32")
        out[f"{split}_x"] = torch.from_numpy(np.stack([im for _, _, im in ranked])).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor([c for _, c, _ in ranked], dtype=torch.long)
    return out


def load_cifar_tree(src: Path) -> dict:
    """Decode an image-folder tree or tar once; later calls read the cached uint8 tensors."""
    path = cache_dir() / f"cifar10-{_fingerprint(src)}.pt"
    if path.exists():
        try:
            return load_state(path, "decoded CIFAR-10 cache")
        except CheckpointError as err:  # a cache holds nothing the source does not: remake it
            print(f"localnet: {err}; decoding {src} again, to replace it", file=sys.stderr)
    t0 = time.time()
    data = _decode_tree(src)
    data["source"], data["decode_s"] = str(src), time.time() - t0
    try:
        save_state(data, path)  # atomic: parallel workers never read a half-written file
    except UnwritableError as err:  # the data is decoded: no cache costs time only
        print(f"localnet: cannot cache the decoded CIFAR-10 at {err.path} ({err.why}), so the "
              f"next run decodes it again; $LOCALNET_CACHE names a writable folder for it",
              file=sys.stderr)
    return data


def _cifar_source(root, download) -> Path | None:
    """An image-folder tree or its tar; None: torchvision's own layout (or its download)."""
    # (a) torchvision's own layout
    tv = root / "cifar-10-batches-py"
    # (b) an image-folder tree, (c) a tar of that tree
    trees = [root / "cifar10", root / "cifar10-jpeg", root]
    tars = [root / "cifar10-jpeg.tar", root / "cifar10.tar"]
    if tv.is_dir():
        return None
    src = next((t for t in trees if (t / "train").is_dir() and (t / "test").is_dir()), None)
    src = src or next((t for t in tars if t.is_file()), None)
    if src is None and not download:
        looked = [tv] + [t / s for t in trees for s in ("train", "test")] + tars
        raise _how_to_get("cifar10", looked, "cifar-10-batches-py/ (torchvision), or "
                          "cifar10-jpeg.tar / a cifar10/ folder with train/<class>/*.jpg and "
                          "test/<class>/*.jpg")
    return src


def _load_cifar10(root, download):
    import torchvision
    src = _cifar_source(root, download)
    if src is None:  # torchvision layout, downloading it only if asked to
        splits = [torchvision.datasets.CIFAR10(str(root), train=t, download=download) for t in (True, False)]
        xs = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in splits]
        ys = [torch.tensor(s.targets, dtype=torch.long) for s in splits]
        classes = splits[0].classes
    else:
        d = load_cifar_tree(src)
        xs, ys, classes = [d["train_x"], d["test_x"]], [d["train_y"], d["test_y"]], d["classes"]
    return xs, ys, classes


# -----------------------------------------------------------------------------
# generic image folder (ImageNet-like): per-sample decoding and transforms

class SeededTransformDataset(Dataset):
    """ImageFolder samples with a transform whose randomness comes from (seed, epoch, index),
    so augmentation is reproducible regardless of order, without touching the global RNG."""

    def __init__(self, folder, transform, indices=None, seed=None):
        self.folder, self.transform, self.seed = folder, transform, seed
        self.indices = list(range(len(folder))) if indices is None else indices

    def __len__(self):
        return len(self.indices)

    def for_epoch(self, g: torch.Generator) -> "SeededTransformDataset":
        view = copy.copy(self)
        view.seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return view

    def __getitem__(self, i):
        img, label = self.folder[self.indices[i]]
        if self.seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + i)
            return self.transform(img), label


def _imagefolder_source(root) -> tuple[Path, Path]:
    train_dir = root / "train"
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise _how_to_get("imagefolder", [train_dir, root / "val", root / "test"],
                          "train/<class>/*.jpg and val/<class>/*.jpg (or test/)",
                          downloads=False)
    return train_dir, test_dir


def find_data(name: str, root: str | None = None, download: bool = False) -> Path | None:
    """Where load_data would read `name` from (None: generated, or downloaded), without
    reading it; DatasetNotFoundError, naming where it looked, when it is not there.
    `localnet validate` asks it before a run would."""
    name = _canonical(name)
    root = resolve_root(root)
    if name in _MNIST_DIRS:
        return _mnist_source(name, root, download)
    if name == "cifar10":
        return _cifar_source(root, download) or root / "cifar-10-batches-py"
    if name == "imagefolder":
        return _imagefolder_source(root)[0].parent
    return None


def _load_imagefolder(root, augment, image_size):
    import torchvision
    from torchvision.transforms import v2
    train_dir, test_dir = _imagefolder_source(root)
    mean, std = MEAN_STD["imagenet"]
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    test_tf = v2.Compose([v2.Resize(round(image_size * 256 / 224)), v2.CenterCrop(image_size), *tail])
    train_tf = v2.Compose([v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip(), *tail]) if augment else test_tf
    try:
        train = torchvision.datasets.ImageFolder(str(train_dir))
        test = torchvision.datasets.ImageFolder(str(test_dir))
    except FileNotFoundError as err:  # torchvision names the class, not the folder
        raise DatasetError(f"{root}: {err}") from None
    if test.classes != train.classes:
        raise DatasetError(f"{test_dir} and {train_dir} have different class folders "
                           f"({', '.join(sorted(set(test.classes) ^ set(train.classes)))} "
                           f"in only one)")
    return SeededTransformDataset(train, train_tf), SeededTransformDataset(test, test_tf), train.classes


# -----------------------------------------------------------------------------
# synthetic: a learnable problem for tests

def _available_bytes() -> int:
    """Memory a new allocation can take: Linux's MemAvailable (free pages plus the page
    cache it can drop), else the free pages alone."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _synthetic_fits(size: int, test_size: int, shape: tuple) -> None:
    """Drawn images are held whole, as float32, and a split takes about three times
    its size while it is drawn (the noise, the prototypes picked, their sum): a size
    that cannot fit is named before torch's allocator fails with a byte count."""
    need = (3 * max(size, test_size) + size + test_size) * math.prod(shape) * 4
    free = _available_bytes()
    if need > free:
        raise DatasetError(f"data.subset / data.test_subset: {size:,} synthetic training and "
                           f"{test_size:,} test images of {'x'.join(map(str, shape))} take "
                           f"about {need / 2**30:,.1f} GiB while drawn, and this machine has "
                           f"{free / 2**30:,.1f} GiB free; ask for fewer")


def _synthetic(seed, shape, size, num_classes=10, test_size=None):
    g = _generator(seed, -1)
    protos = torch.randn(num_classes, *shape, generator=g)  # one mean pattern per class

    def draw(n):
        y = torch.randperm(n, generator=g) % num_classes  # balanced classes, shuffled
        return 0.5 * protos[y] + torch.randn(n, *shape, generator=g), y

    (xtr, ytr), (xte, yte) = draw(size), draw(max(test_size or size // 2, 1))
    return TensorImageDataset(xtr, ytr), TensorImageDataset(xte, yte)


# -----------------------------------------------------------------------------

def load_data(name: str, root: str | None = None, subset: int | None = None, test_subset: int | None = None,
              augment: bool | None = None, download: bool = False, seed: int = 0,
              image_size: int = 224, synthetic_shape: tuple | None = None,
              synthetic_size: int = 512) -> DataBundle:
    """Load a dataset by name. subset / test_subset keep the first N samples in dataset order.
    augment=None means the dataset's default (on for cifar10 and imagefolder train sets).
    seed only matters for 'synthetic'; shuffling is seeded in DataBundle.train_loader."""
    name = _canonical(name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")
    if augment and name in ("mnist", "fashion_mnist", "synthetic"):
        raise ValueError(f"dataset '{name}' has no augmentation; set augment to false or null")
    classes = None
    if name == "synthetic":
        shape = tuple(synthetic_shape or (3, 32, 32))
        # a subset larger than the default draws that many (a benchmark on a machine
        # without the datasets); smaller ones keep the same first images
        size = max(synthetic_size, subset or 0)
        test_size = max(size // 2, test_subset or 0)
        _synthetic_fits(size, test_size, shape)
        train, test = _synthetic(seed, shape, size, test_size=test_size)
        num_classes = 10
    elif name in ("mnist", "fashion_mnist"):
        train, test, classes = _load_mnist(name, resolve_root(root), download)
        shape, num_classes = (1, 28, 28), 10
    elif name == "cifar10":
        (xtr, xte), (ytr, yte), classes = _load_cifar10(resolve_root(root), download)
        mean, std = MEAN_STD["cifar10"]
        train = TensorImageDataset(xtr, ytr, mean, std, augment=augment is not False)
        test = TensorImageDataset(xte, yte, mean, std)
        shape, num_classes = (3, 32, 32), len(classes)
    else:
        train, test, classes = _load_imagefolder(resolve_root(root), augment is not False, image_size)
        shape, num_classes = (3, image_size, image_size), len(classes)
    for key, n, ds, split in (("data.subset", subset, train, "training"),
                              ("data.test_subset", test_subset, test, "test")):
        if n is not None and n > len(ds):  # a run's figures then count fewer than asked for
            print(f"localnet: note: {key}: {n:,} is more than {name}'s {len(ds):,} {split} "
                  f"samples; all {len(ds):,} are used", file=sys.stderr)
    train, test = _take(train, subset), _take(test, test_subset)
    return DataBundle(train, test, shape, num_classes, name, classes)


def _canonical(name: str) -> str:
    name = name.lower().replace("-", "_")
    return {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10"}.get(name, name)


def _take(ds, n):
    """The first n samples of ds (all if n is None)."""
    if n is None or n >= len(ds):
        return ds
    ds = copy.copy(ds)
    if isinstance(ds, TensorImageDataset):
        ds.x, ds.y = ds.x[:n].clone(), ds.y[:n].clone()  # clone: let the full tensors be freed
    else:
        ds.indices = ds.indices[:n]
    return ds
