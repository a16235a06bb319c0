"""Data sets and their seeded partitioning across clients.

Only these loaders touch the network, and only for a URL the config names.
`digits` (scikit-learn's bundled 8x8 handwritten digits) works offline.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .data_url import authorised
from .urls import shown
from .entry import BadRequest

OBJ_HELP = ("FedKeeper's pickled .obj data files are refused: loading them would run pickle. "
            "Convert them once, in a trusted environment, to a Keras-style mnist.npz: "
            "numpy.savez('mnist.npz', x_train=..., y_train=..., x_test=..., y_test=...), "
            "then set training_test_data: {dataset: npz, path: mnist.npz}.")


def _scale(x: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] with a channel axis: (N, H, W) -> (N, H, W, 1).
    Integer images are 8-bit (MNIST) unless their maximum says 4-bit (digits)."""
    raw = x
    x = x.astype(np.float32)
    top = float(x.max()) if x.size else 1.0
    if raw.dtype == np.uint8 or top > 16.0:
        x /= 255.0
    elif top > 1.0:
        x /= 16.0
    return x[..., None] if x.ndim == 3 else x


def _labels(y: np.ndarray) -> np.ndarray:
    """Integer class labels; one-hot rows are accepted too."""
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)
    return y.reshape(-1).astype(np.int64)


#: scikit-learn's bundled digits, inside its package (the file its load_digits reads).
DIGITS_CSV = ("datasets", "data", "digits.csv.gz")
#: The fixed, stratified split of the digits, the same for every session:
#: row numbers of the training set, then of the test set, in the order
#: sklearn.model_selection.train_test_split(test_size=0.25, random_state=0,
#: stratify=labels) draws them (tests/test_data_models.py checks both
#: against scikit-learn).
DIGITS_SPLIT = Path(__file__).with_name("digits_split.json")


def load_digits_split() -> tuple[np.ndarray, ...]:
    """The digits as float32 (N, 8, 8, 1) in [0, 1] and int64 labels,
    split. Read from scikit-learn's package data without importing
    scikit-learn, whose import would cost a cold function about 1 s of CPU."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise BadRequest("the digits data set comes with scikit-learn, which this runtime does not carry")
    rows = np.loadtxt(Path(spec.submodule_search_locations[0], *DIGITS_CSV), delimiter=",")
    x = (rows[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[..., None]
    y = rows[:, -1].astype(np.int64)
    split = json.loads(DIGITS_SPLIT.read_text())
    train, test = np.asarray(split["train"], dtype=np.int64), np.asarray(split["test"], dtype=np.int64)
    return x[train], y[train], x[test], y[test]


def cache_dir() -> Path:
    d = Path(os.environ.get("FK_DATA_CACHE", Path(tempfile.gettempdir()) / "fedkeeper-data"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: The most a data set may download or decode to: far above what a function
#: trains on, below what would take it down before the bound is reached.
MAX_DATA_BYTES = 2 << 30
#: The most a whole download may take (each read is bounded by `timeout_s`,
#: and a server sending a byte at a time would otherwise never end it).
DOWNLOAD_DEADLINE_S = 600.0


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Redirects only to http(s), and never from https to http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = req.full_url.split(":", 1)[0].lower(), newurl.split(":", 1)[0].lower()
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise urllib.error.URLError(f"refused a redirect from {old} to {shown(newurl)[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, authorization: str | None, out, timeout_s: float, deadline_s: float) -> None:
    request = urllib.request.Request(url)
    if authorization:
        # Unredirected: the credentials go to this URL only, never to
        # wherever it redirects.
        request.add_unredirected_header("Authorization", authorization)
    opener = urllib.request.build_opener(_NoDowngrade)
    until = time.monotonic() + deadline_s
    with opener.open(request, timeout=timeout_s) as resp:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > MAX_DATA_BYTES:
            raise BadRequest(f"{shown(url)} is {int(declared):,} bytes, more than the {MAX_DATA_BYTES:,} "
                             "a data set may be")
        got = 0
        while block := resp.read1(1 << 20):
            got += len(block)
            if got > MAX_DATA_BYTES:
                raise BadRequest(f"{shown(url)} is more than the {MAX_DATA_BYTES:,} bytes a data set may be")
            if time.monotonic() > until:
                raise BadRequest(f"downloading {shown(url)} took more than {deadline_s:g} s")
            out.write(block)


def is_url(location: str) -> bool:
    """An http(s) URL, its scheme in any case (as the config accepts it)."""
    return location[:8].lower().startswith(("http://", "https://"))


def fetch(location: str, sha256: str | None = None, timeout_s: float = 60.0,
          deadline_s: float = DOWNLOAD_DEADLINE_S, credentials: dict[str, str] | None = None) -> Path:
    """A local path as is, or an http(s) URL downloaded once into the cache
    (at most MAX_DATA_BYTES, within `deadline_s`, redirected only to http(s)
    and never down from https; authorised by its user info, else by
    `credentials` for its origin: data_url.py). With a checksum, a mismatch
    is an error (and the bad file is dropped). Messages show the URL
    without its user info or query."""
    if is_url(location):
        url, authorization = authorised(location, credentials)
        # Keyed by the credentials too: a copy fetched with them is never
        # served to a request made without them, or with others.
        key = hashlib.sha256(f"{url}\n{authorization or ''}".encode()).hexdigest()[:16]
        name = key + "-" + Path(url.split("?")[0]).name
        path = cache_dir() / name
        if not path.exists():
            # A unique temporary name: concurrent cold starts may download
            # the same file; each renames its complete copy into place.
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    _download(url, authorization, out, timeout_s, deadline_s)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise BadRequest(f"cannot download {shown(location)}: {exc}") from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(path)
    else:
        path = Path(location).expanduser()
        if not path.is_file():
            raise BadRequest(f"data file {shown(location) if '://' in location else location} does not exist")
    if sha256 and _sha256(path) != sha256.lower():
        if is_url(location):
            path.unlink(missing_ok=True)
        raise BadRequest(f"checksum mismatch for {shown(location)}: expected sha256 {sha256}")
    return path


def _declared_bytes(path: Path) -> int:
    """What the arrays of an npz say they hold, read from their .npy headers
    alone (a compressed member is inflated only as far as its header): a
    few megabytes of deflate can declare gigabytes."""
    from numpy.lib import format as npy
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as member:
                version = npy.read_magic(member)
                reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = reader(member)
                total += math.prod(shape) * dtype.itemsize
    return total


def load_npz(location: str, sha256: str | None = None,
             credentials: dict[str, str] | None = None) -> tuple[np.ndarray, ...]:
    """Keras' mnist.npz layout: x_train, y_train, x_test, y_test. A download
    that turns out not to be one is dropped from the cache, so the next
    session downloads it again rather than meet the same bad copy."""
    path = fetch(location, sha256, credentials=credentials)
    try:
        return _read_npz(path, shown(location))
    except BadRequest:
        if is_url(location):
            path.unlink(missing_ok=True)
        raise


def _read_npz(path: Path, where: str) -> tuple[np.ndarray, ...]:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"
        raise BadRequest(f"{where} is a single .npy array, not an npz archive" if npy
                         else f"{where} is not a pickle-free npz: not a zip archive")
    try:
        declared = _declared_bytes(path)
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise BadRequest(f"{where} is not a pickle-free npz: {exc}") from None
    if declared > MAX_DATA_BYTES:
        z.close()
        raise BadRequest(f"{where} declares {declared:,} bytes of arrays, more than the {MAX_DATA_BYTES:,} "
                         "a data set may hold")
    with z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise BadRequest(f"{where} lacks {sorted(missing)} (expected Keras' mnist.npz layout)")
        try:
            return (_scale(z["x_train"]), _labels(z["y_train"]), _scale(z["x_test"]), _labels(z["y_test"]))
        except (ValueError, OSError, zipfile.BadZipFile) as exc:  # e.g. an object array inside
            raise BadRequest(f"{where} is not a pickle-free npz: {exc}") from None
        except MemoryError:
            raise BadRequest(f"{where}: its arrays do not fit in this function's memory") from None


def load_dataset(data: dict[str, Any], credentials: dict[str, str] | None = None) -> tuple[np.ndarray, ...]:
    """The data set a session's spec names; `credentials`: what the keeper
    bound for its URL's origin (data_url.py)."""
    kind = data.get("dataset", "digits")
    if kind == "fedkeeper_obj" or any(str(v).split("?")[0].endswith(".obj") for v in data.values()):
        raise BadRequest(OBJ_HELP)
    if kind == "digits":
        return load_digits_split()
    if kind == "npz":
        location = data.get("path") or data.get("url")
        if not isinstance(location, str) or not location:
            raise BadRequest("dataset npz needs a path (a local file or an http(s) URL)")
        return load_npz(location, data.get("sha256"), credentials)
    raise BadRequest(f"unknown dataset {kind!r}")


def partition(labels: np.ndarray, n_clients: int, method: str = "iid", seed: int = 0,
              alpha: float = 0.5, shards_per_client: int = 2) -> list[np.ndarray]:
    """Indices per client; every client gets at least one sample."""
    n = len(labels)
    if n_clients < 1 or n < n_clients:
        raise BadRequest(f"cannot split {n} samples over {n_clients} clients")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), n_clients)
    elif method == "shards":
        # McMahan et al.: sort by label, cut into shards, deal shards out.
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]
        n_shards = n_clients * shards_per_client
        if n_shards > n:
            raise BadRequest(f"{n_shards} shards need at least as many samples (have {n})")
        shards = np.array_split(order, n_shards)
        deal = rng.permutation(n_shards)
        parts = [np.concatenate([shards[s] for s in deal[i::n_clients]]) for i in range(n_clients)]
    elif method == "dirichlet":
        buckets: list[list[int]] = [[] for _ in range(n_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for b, chunk in zip(buckets, np.split(idx, cuts)):
                b.extend(chunk.tolist())
        # Give any empty client one sample from the largest.
        for b in buckets:
            if not b:
                donor = max(buckets, key=len)
                b.append(donor.pop())
        parts = [np.array(sorted(b), dtype=np.int64) for b in buckets]
    else:
        raise BadRequest(f"unknown partition method {method!r}")
    return [np.sort(p).astype(np.int64) for p in parts]
