"""Datasets as numpy arrays: embedded digits, 2-D toys, MNIST/Fashion-MNIST (IDX or TFDS), any prepared TFDS set.

Every loader returns a :class:`Dataset` ``(images, labels, num_classes)`` with

* ``images``: float32, NHWC ``(n, h, w, c)`` scaled to ``[0, 1]`` for image sets; ``(n, 2)`` for the 2-D toys;
* ``labels``: int32 ``(n,)``;
* ``num_classes``: int.

Where the data lives: ``data_dir`` argument, else the ``JAXPRUNE_DATA_DIR`` environment variable, else
``~/tensorflow_datasets``. For MNIST-like sets the directory may hold the raw IDX ``.gz`` files (directly or in a
``<name>/`` subfolder) or a TFDS-prepared folder (``<name>/<version>/`` directly or under ``tensorflow_datasets/``).
Decoded TFDS arrays are cached as ``.npz`` under ``JAXPRUNE_CACHE_DIR`` (default ``~/.cache/jaxprune``).

Text corpora (character-level language modelling) come from :func:`load_text` as a :class:`TextData`
``(train, val, vocab)``: ``train``/``val`` int32 ``(n,)`` character ids, ``vocab`` the sorted distinct characters.
``shakespeare`` is ``<data_dir>/shakespeare/shakespeare.txt`` (checked against its published sha256), split by
characters: the first 90 % for training, the rest for validation.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "DataError", "load", "available", "standardize", "scale_to_unit_range", "TOY_SIZES",
           "TextData", "load_text", "text_data", "encode", "decode", "TEXTS"]


class Dataset(NamedTuple):
    images: np.ndarray  # (n, h, w, c) float32, or (n, 2) for toys
    labels: np.ndarray  # (n,) int32
    num_classes: int


class TextData(NamedTuple):
    train: np.ndarray  # (n_train,) int32 character ids
    val: np.ndarray  # (n_val,) int32 character ids
    vocab: str  # the distinct characters, sorted; id i is vocab[i]


class DataError(ValueError):
    """Raised for unknown names, missing or corrupt files, and data that cannot be obtained offline."""


SPLITS = ("train", "test")
TOY_SIZES = {"moons": 2000, "circles": 2000, "spiral": 4000}

# Published MD5 checksums of the original distribution files (see the datasets' home pages).
_IDX_FILES = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def available() -> tuple[str, ...]:
    """Names with a dedicated loader; any other name is tried as a TFDS dataset."""
    return ("digits", "moons", "circles", "spiral", "mnist", "fashion_mnist")


def load(name: str, split: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
         num_examples: int | None = None) -> Dataset:
    """Load ``split`` (``"train"`` or ``"test"``) of dataset ``name``.

    ``seed`` only affects the generated 2-D toys (the test split uses a different stream than train);
    ``num_examples`` overrides a toy's size. Returns copies the caller may modify.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r}: expected one of {SPLITS}")
    if name == "digits":
        return _digits(split)
    if name in TOY_SIZES:
        n = TOY_SIZES[name] if num_examples is None else int(num_examples)
        if n < 1:
            raise DataError(f"num_examples={num_examples}: expected a positive count")
        return make_toy(name, n, seed * 2 + (split == "test"))
    root = resolve_data_dir(data_dir)
    if name in _IDX_FILES:
        raw = _find_idx_dir(name, root)
        if raw is not None:
            return _idx(name, split, str(raw))
    return _tfds(name, split, root)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get("JAXPRUNE_DATA_DIR") or Path.home() / "tensorflow_datasets"
    return Path(data_dir).expanduser()


# ----------------------------------------------------------------------------------------------- digits / toys
@functools.lru_cache(maxsize=None)
def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # embedded in scikit-learn, no download

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    labels = d.target.astype(np.int32)
    perm = np.random.RandomState(0).permutation(len(labels))  # the fixed split: 1437 train / 360 test
    return images[perm], labels[perm]


def _digits(split: str) -> Dataset:
    images, labels = _digits_all()
    cut = 1437
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    return Dataset(images[sl].copy(), labels[sl].copy(), 10)


def make_toy(name: str, n: int, seed: int) -> Dataset:
    """2-D toy sets: ``moons`` (noise 0.1), ``circles`` (noise 0.1, factor 0.3), 4-arm ``spiral``."""
    from sklearn.datasets import make_circles, make_moons

    if name == "moons":
        x, y = make_moons(n_samples=n, noise=0.1, random_state=seed)
        c = 2
    elif name == "circles":
        x, y = make_circles(n_samples=n, noise=0.1, factor=0.3, random_state=seed)
        c = 2
    elif name == "spiral":
        x, y = _spiral(n, arms=4, seed=seed)
        c = 4
    else:
        raise DataError(f"name={name!r}: not a toy dataset; expected one of {tuple(TOY_SIZES)}")
    return Dataset(x.astype(np.float32), y.astype(np.int32), c)


def _spiral(n: int, arms: int, seed: int, noise: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """``arms`` interleaved Archimedean spirals; radius grows to 1, each arm turns 1.5 times."""
    rng = np.random.RandomState(seed)
    y = np.arange(n) % arms
    t = rng.uniform(0.05, 1.0, size=n)
    angle = 3.0 * np.pi * t + 2.0 * np.pi * y / arms + rng.normal(0, noise, size=n) * t
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    return x, y


# ----------------------------------------------------------------------------------------------- IDX files
def _find_idx_dir(name: str, root: Path) -> Path | None:
    wanted = next(iter(_IDX_FILES[name]))
    for cand in (root / name, root):
        if (cand / wanted).exists():
            return cand
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _idx_cached(name: str, split: str, directory: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(directory)
    arrays = []
    for kind in ("images", "labels"):
        fname = f"{_IDX_PREFIX[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        path = d / fname
        if not path.exists():
            raise DataError(f"{name}: missing file {path} (expected the original IDX file {fname})")
        expected = _IDX_FILES[name][fname]
        got = _md5(path)
        if got != expected:
            raise DataError(f"{name}: checksum mismatch for {path}: md5 {got}, expected {expected} "
                            "(corrupt or not the original file; download it again)")
        arrays.append(_read_idx(path))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{name}/{split}: {len(images)} images but {len(labels)} labels in {d}")
    return images, labels


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def _idx(name: str, split: str, directory: str) -> Dataset:
    images, labels = _idx_cached(name, split, directory)
    return Dataset((images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32), 10)


# ----------------------------------------------------------------------------------------------- TFDS
def _tfds_root(name: str, root: Path) -> Path:
    """The TFDS data_dir: ``root`` itself or ``root/tensorflow_datasets`` if the dataset is found there."""
    for cand in (root, root / "tensorflow_datasets"):
        if (cand / name).is_dir():
            return cand
    return root


def _cache_dir() -> Path:
    return Path(os.environ.get("JAXPRUNE_CACHE_DIR") or Path.home() / ".cache" / "jaxprune")


def _tfds(name: str, split: str, root: Path) -> Dataset:
    tfds_dir = _tfds_root(name, root)
    key = hashlib.sha1(f"{tfds_dir.resolve()}|{name}|{split}".encode()).hexdigest()[:16]
    cache = _cache_dir() / f"{name}-{split}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return Dataset(z["images"].copy(), z["labels"].copy(), int(z["num_classes"]))
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a core dependency
        raise DataError(f"name={name!r}: reading TFDS data needs tensorflow-datasets ({e})") from e
    try:
        builder = tfds.builder(name, data_dir=str(tfds_dir))
    except Exception as e:  # DatasetNotFoundError and friends
        raise DataError(f"name={name!r}: unknown dataset; jaxprune knows {available()} and any registered "
                        f"TFDS name ({type(e).__name__})") from None
    if not builder.is_prepared():
        _prepare_or_explain(name, builder, tfds_dir)
    source = tfds.data_source(name, split=split, data_dir=str(tfds_dir), download=False)
    n = len(source)
    first = source[0]
    image_key = "image" if "image" in first else next(k for k, v in first.items() if np.ndim(v) >= 2)
    images = np.empty((n,) + np.shape(first[image_key]), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int32)
    for i in range(n):  # decoding is per record (PNG); slow once, then cached
        rec = source[i]
        images[i] = rec[image_key]
        labels[i] = rec["label"]
    num_classes = int(builder.info.features["label"].num_classes)
    out = Dataset(images.astype(np.float32) / 255.0, labels, num_classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=out.images, labels=out.labels, num_classes=num_classes)
    os.replace(tmp, cache)
    return out


def _prepare_or_explain(name: str, builder, tfds_dir: Path) -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise DataError(
            f"name={name!r}: dataset is not prepared in {tfds_dir} and TensorFlow is not installed to build it. "
            f"Either point --data_dir / JAXPRUNE_DATA_DIR at a directory holding a prepared "
            f"'{name}/<version>/' (ArrayRecord format), or run on a machine with network access: "
            f"pip install -e '.[tfds-build]' && python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}', data_dir='{tfds_dir}', file_format='array_record').download_and_prepare()\""
        ) from None
    import tensorflow_datasets as tfds

    tfds.builder(name, data_dir=str(tfds_dir), file_format="array_record").download_and_prepare()
    del builder


# ----------------------------------------------------------------------------------------------- text
# Text corpora: file under the data dir, its sha256 (see the data README) and the training fraction of the split.
TEXTS = {"shakespeare": ("shakespeare/shakespeare.txt",
                         "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d", 0.9)}


def load_text(name: str, data_dir: str | os.PathLike | None = None) -> TextData:
    """Character-level corpus ``name`` (a key of :data:`TEXTS`) split into train/val ids (see :func:`text_data`).

    The file is checked against its published sha256; a missing or changed file is a :class:`DataError` naming it."""
    if name not in TEXTS:
        raise DataError(f"name={name!r}: unknown text corpus; expected one of {tuple(TEXTS)}")
    rel, sha, train_fraction = TEXTS[name]
    path = resolve_data_dir(data_dir) / rel
    return _text_cached(str(path), sha, train_fraction)


@functools.lru_cache(maxsize=2)
def _text_cached(path: str, sha: str, train_fraction: float) -> TextData:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"missing file {p} (expected the corpus there: pass --data_dir or set JAXPRUNE_DATA_DIR to "
                        "the folder holding shakespeare/shakespeare.txt)")
    raw = p.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != sha:
        raise DataError(f"{p}: checksum mismatch, sha256 {got}, expected {sha} (corrupt or not the published file)")
    return text_data(raw.decode("ascii"), train_fraction)


def text_data(text: str, train_fraction: float = 0.9) -> TextData:
    """``text`` as ids over its sorted distinct characters; the first ``floor(train_fraction · len)`` characters are
    the training split, the rest validation (floor: 5,057,321 · 0.9 → 4,551,588 for Shakespeare)."""
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction={train_fraction!r}: expected a fraction in (0, 1)")
    if len(text) < 2:
        raise DataError(f"text: expected at least 2 characters, got {len(text)}")
    vocab = "".join(sorted(set(text)))
    ids = encode(text, vocab)
    cut = int(np.floor(train_fraction * len(text)))
    cut = min(max(cut, 1), len(text) - 1)
    return TextData(ids[:cut].copy(), ids[cut:].copy(), vocab)


def encode(text: str, vocab: str) -> np.ndarray:
    """``text`` as int32 ids ``(len(text),)`` into the sorted ``vocab``; a character outside it is a DataError."""
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), np.uint32)
    ids = np.minimum(np.searchsorted(table, points), len(table) - 1).astype(np.int32)
    bad = table[ids] != points
    if bad.any():
        raise DataError(f"text: character {text[int(np.argmax(bad))]!r} is not in the vocabulary "
                        f"({len(vocab)} characters)")
    return ids


def decode(ids, vocab: str) -> str:
    """Ids ``(n,)`` back to text."""
    return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


# ----------------------------------------------------------------------------------------------- transforms
def standardize(images: np.ndarray, mean: float | None = None, std: float | None = None) -> np.ndarray:
    """``(x - mean) / std``; statistics default to those of ``images`` (pass the train split's for test)."""
    mean = float(images.mean()) if mean is None else mean
    std = float(images.std()) if std is None else std
    return ((images - mean) / std).astype(np.float32)


def scale_to_unit_range(images: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` pixels to ``[-1, 1]``."""
    return (images * 2.0 - 1.0).astype(np.float32)
