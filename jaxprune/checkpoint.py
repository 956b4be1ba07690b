"""Orbax save/restore of experiment state.

Trees are stored as their flattened leaves (``{"00000": leaf, …}``) and rebuilt against a template of the same
structure, so any pytree — optax states with empty NamedTuples, masks of bools, PRNG keys — round-trips exactly.
Orbax writes to a temporary directory and renames it when complete, so a crash never leaves a half-written
checkpoint that looks finished. :func:`save` returns a sha256 of the leaves; :func:`restore` given it refuses a
checkpoint whose files were changed since (flipped bytes restore silently otherwise).

Stored records (docs/design.md, "Reliability"): :func:`write_record` stores a JSON record with its own checksum
(``record_sha256``) and identity (level, seed, round, …); :func:`read_record` verifies both on every read and refuses a
mismatch with one line naming the file and what to delete (:class:`RecordError`, which callers of derived records
catch to recompute them). :func:`workdir_lock` gives a run sole use of its workdir; :func:`interrupts_deferred` holds a
SIGINT back while a checkpoint and its record are written, so an interrupted write is whole or absent.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any


def _flat(tree: PyTree) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


def _sha256(flat: dict[str, np.ndarray]) -> str:
    """sha256 over the leaves in key order: each leaf's key, dtype and shape, then its bytes (C order)."""
    h = hashlib.sha256()
    for k in sorted(flat):
        x = np.ascontiguousarray(flat[k])
        h.update(f"{k}:{x.dtype.str}:{x.shape};".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def save(path: str | os.PathLike, tree: PyTree) -> str:
    """Write ``tree`` to the directory ``path`` (must not exist yet); returns the sha256 of its leaves (hex), for
    :func:`restore` to check."""
    path = Path(path).absolute()
    flat = _flat(tree)
    with interrupts_deferred(), ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, flat)
        _test_delay()
        ckpt.wait_until_finished()
    return _sha256(flat)


# Test hook: seconds to sleep inside every save (the SIGINT-mid-checkpoint tests and benchmarks/probe_records.py);
# the sleep ends early once the file named by SAVE_RELEASE_ENV exists (so a test on a loaded machine need not guess).
SAVE_DELAY_ENV = "JAXPRUNE_TEST_SAVE_DELAY"
SAVE_RELEASE_ENV = "JAXPRUNE_TEST_SAVE_RELEASE"


def _test_delay() -> None:
    delay = os.environ.get(SAVE_DELAY_ENV)
    if delay:
        print(f"[{SAVE_DELAY_ENV}] saving", file=sys.stderr, flush=True)
        release, end = os.environ.get(SAVE_RELEASE_ENV), time.monotonic() + float(delay)
        while time.monotonic() < end and not (release and os.path.exists(release)):
            time.sleep(0.1)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) back while the block runs and raise it as KeyboardInterrupt when the block is done, so a
    checkpoint and its record are written whole (orbax's threads are not torn down mid-write). A second SIGINT stops
    at once. Only in the main thread with Python's default SIGINT handler installed (nested uses: the outer one
    holds)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    got: list[int] = []

    def hold(signum, frame):
        if got:
            raise KeyboardInterrupt
        got.append(signum)
        print("interrupt received: finishing the checkpoint being written (interrupt again to stop at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


def restore(path: str | os.PathLike, template: PyTree, sha256: str | None = None, hint: str = "") -> PyTree:
    """Read the tree saved at ``path``; ``template`` gives the structure, shapes and dtypes.

    ``sha256`` (what :func:`save` returned; None: unchecked): a ValueError if the restored leaves differ.
    ``hint``: appended to the error messages (what to do about a corrupt checkpoint)."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist{hint}")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in _flat(template).items()}
    try:
        with ocp.StandardCheckpointer() as ckpt:
            loaded = ckpt.restore(path, abstract)
    except Exception as e:  # orbax/tensorstore errors on damaged files come in many types
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:300]}){hint}") from e
    if len(loaded) != len(leaves):
        raise ValueError(f"checkpoint {path} holds {len(loaded)} leaves, the template {len(leaves)}{hint}")
    flat = {k: np.asarray(loaded[k]) for k in sorted(loaded)}
    if sha256 is not None and _sha256(flat) != sha256:
        raise ValueError(f"checkpoint {path}: its contents do not match the sha256 recorded when it was saved "
                         f"(a corrupt or changed file){hint}")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in flat.values()])


def restore_recorded(path: str | os.PathLike, template: PyTree, record: Mapping, key: str = "checkpoint_sha256",
                     hint: str = "") -> PyTree:
    """:func:`restore` checked against the sha256 a record holds under ``key``; a record without one (written by an
    older version) is refused: such a checkpoint cannot be verified, and is never restored or extended from."""
    sha = record.get(key)
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError(f"checkpoint {Path(path).absolute()}: its record holds no {key} (written by an older "
                         f"version), so the checkpoint cannot be verified{hint}")
    return restore(path, template, sha, hint=hint)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (temp file + rename): readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """The JSON value in ``path``; a corrupt or truncated file is a ValueError naming it (``hint`` appended)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON, the file is corrupt or truncated ({e}){hint}") from None


def as_stored(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples become lists, ...): settings are compared in the form they are stored."""
    return json.loads(json.dumps(obj))


def settings_diff(old: dict, new: dict, added_later: dict | None = None) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for every setting that differs between a stored record ``old`` and the
    settings ``new`` (both as JSON holds them). ``added_later``: settings introduced after records were first
    written, with the value an older record that lacks them was made with (only keys of ``new`` are filled in)."""
    old, new = as_stored(old), as_stored(new)
    old.update(as_stored({k: v for k, v in (added_later or {}).items() if k not in old and k in new}))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def format_settings_diff(diff: dict[str, tuple]) -> str:
    """``"lr: 0.05 -> 0.5, training_steps: '5' -> '50'"`` (each differing setting, old value -> new value)."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))


def check_run_config(workdir: str | os.PathLike, record: dict, volatile: tuple = (),
                     added_later: dict | None = None, migrate: Callable[[dict], dict] | None = None) -> None:
    """Record a run's settings in ``workdir/config.json``, or refuse to resume a run made with other settings.

    ``volatile``: keys that may change between a run and its resumption (not recorded, not compared).
    ``added_later``: settings introduced after workdirs were first written, with the value an older
    ``config.json`` that lacks them ran with. ``migrate``: maps a stored record written under older setting names
    to the current ones before the comparison (the file itself is left as it is).
    """
    path = Path(workdir) / "config.json"
    # compared as JSON holds them (tuples become lists), so an identical Python config is not refused
    clean = as_stored({k: v for k, v in record.items() if k not in volatile})
    if not path.exists():
        write_record(path, clean)
        return
    stored = read_record(path, hint=f"; use a new --workdir, or delete {workdir} to start over")
    stored = migrate(stored) if migrate is not None else stored
    old = {k: v for k, v in stored.items() if k not in volatile}
    diff = settings_diff(old, clean, {k: v for k, v in (added_later or {}).items() if k not in volatile})
    if diff:
        raise ValueError(f"workdir {workdir} holds a run with a different config — different settings "
                         f"({format_settings_diff(diff)}); use a new --workdir or delete the old one")


# ----------------------------------------------------------------------------------------------- stored records
RECORD_SHA = "record_sha256"


class RecordError(ValueError):
    """A stored record whose checksum or identity does not match (edited, damaged, moved or swapped)."""


def _record_sha(record: Mapping) -> str:
    """sha256 of ``record`` (without its own checksum) as canonical JSON: sorted keys, no spaces, floats as repr."""
    body = {k: v for k, v in as_stored(dict(record)).items() if k != RECORD_SHA}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_record(path: str | os.PathLike, record: Mapping, identity: Mapping | None = None) -> dict:
    """Store the JSON object ``record`` atomically with its ``identity`` (e.g. ``{"level": 3}``; keys the record
    holds must agree) and its checksum; returns what was stored. :func:`read_record` verifies both."""
    record = dict(record)
    for k, v in (identity or {}).items():
        if k in record and as_stored(record[k]) != as_stored(v):
            raise ValueError(f"{path}: the record says {k}={record[k]!r} but is stored as {k}={v!r}")
        record[k] = v
    record.pop(RECORD_SHA, None)
    record[RECORD_SHA] = _record_sha(record)
    write_json(path, record)
    return record


def read_record(path: str | os.PathLike, expect: Mapping | None = None, hint: str = "") -> dict:
    """The record :func:`write_record` stored at ``path`` (without its checksum), verified: a changed file (checksum)
    or one stored under another identity than ``expect`` (e.g. ``{"level": 3}`` for ``level_3/level.json``) is a
    :class:`RecordError` naming the file (``hint``, what to delete, appended).

    Records written before checksums existed (no ``record_sha256``) are accepted with a warning; their identity is
    still checked where they hold the key (docs/design.md, "Reliability": the rule for old workdirs)."""
    return verify_record(path, read_json(path, hint), expect, hint)


@functools.lru_cache(maxsize=None)
def _warn_unverified(folder: str) -> None:
    """One warning per folder and process (a workdir of old records is read many times by a report)."""
    logging.warning("%s: holds records written before records carried checksums; accepted unverified (rerun in a new "
                    "workdir to have every record checked)", folder)


def verify_record(path: str | os.PathLike, record: Any, expect: Mapping | None = None, hint: str = "") -> dict:
    """:func:`read_record` on the JSON value already read from ``path`` (``path`` names the file in errors)."""
    if not isinstance(record, dict):
        raise RecordError(f"{path}: expected a JSON object (a stored record), got {type(record).__name__}{hint}")
    record = dict(record)
    sha = record.pop(RECORD_SHA, None)
    if sha is None:
        _warn_unverified(str(Path(path).resolve().parent))
    elif sha != _record_sha(record):
        raise RecordError(f"{path}: its contents do not match the checksum stored with it (the file was edited or "
                          f"damaged after it was written){hint}")
    for k, v in (expect or {}).items():
        if (sha is not None or k in record) and as_stored(record.get(k)) != as_stored(v):
            raise RecordError(f"{path}: records {k}={record.get(k)!r} where {k}={v!r} belongs (a folder moved, "
                              f"swapped or copied from elsewhere){hint}")
    return record


# ----------------------------------------------------------------------------------------------- workdir lock
LOCK_NAME = "LOCK"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(lock: Path) -> dict:
    try:
        h = json.loads(lock.read_text())
        return h if isinstance(h, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(h: Mapping) -> str:
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, since {h.get('since', '?')}"


def _try_lock(lock: Path) -> bool:
    """Create ``lock`` holding this process's pid, host and start time; False when it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": since, "argv": sys.argv}, f)
    return True


def _acquire(workdir: Path, lock: Path) -> None:
    for _ in range(3):
        if _try_lock(lock):
            return
        h = _holder(lock)
        stale = (h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int)
                 and h["pid"] != os.getpid() and not _alive(h["pid"]))
        if not stale:
            raise ValueError(f"workdir={workdir} is in use by another run ({_describe(h)}); wait for it to end or use "
                             f"another --workdir (if that run is gone, delete {lock})")
        print(f"workdir={workdir}: taking over the lock of a run that is gone ({_describe(h)})", file=sys.stderr)
        lock.unlink(missing_ok=True)
    raise ValueError(f"workdir={workdir}: its lock {lock} keeps changing hands; another run is starting there")


def _release(lock: Path) -> None:
    h = _holder(lock)
    if h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Sole use of ``workdir`` (created if absent) while the block runs: a lock file ``workdir/LOCK`` holds this
    process's pid, host and start time and is removed on exit (also on exceptions and Ctrl-C). A second run is
    refused at once naming the holder; a lock left by a dead process of this host is taken over with a message.
    A ``workdir`` that is a file is refused; one this call created and that stays empty is removed again."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir={workdir}: is an existing file, not a directory; give --workdir a directory (a new "
                         "one, or an earlier run's to resume it)")
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"workdir={workdir}: cannot be created as a directory ({e.strerror}); give --workdir a "
                         "directory path") from None
    # multi-host runs: each process holds its own lock (all of them write the same workdir)
    lock = workdir / (LOCK_NAME if jax.process_count() == 1 else f"{LOCK_NAME}.{jax.process_index()}")
    _acquire(workdir, lock)
    try:
        yield lock
    finally:
        _release(lock)
        if created and workdir.is_dir() and not any(workdir.iterdir()):
            workdir.rmdir()
