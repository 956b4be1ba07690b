"""Issue #28 (records, lock, interrupts): every stored record carries its checksum and identity and is verified on
every read; one run per workdir (a lock naming its holder); ``--workdir`` naming a file; SIGINT as one line with
every finished level whole. Tiny runs (embedded digits, a few steps); the subprocess cases are marked slow."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import filter_prune, imp as imp_exp, lrp_toy, merge, oneshot, similarity
from jaxprune import checkpoint, imp

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(dataset="digits", model="mlp", hidden=["12"], optimizer="momentum", lr=0.05, schedule="constant",
             milestones=[], training_steps="4", batch_size=64, prune_fraction=0.5, seeds=["2"])


# ----------------------------------------------------------------------------------------------- records
def test_record_round_trips_and_an_edit_is_refused(tmp_path):
    path = tmp_path / "r.json"
    stored = checkpoint.write_record(path, {"acc": 0.25, "w": (1, 2), "x": float("nan")}, {"level": 3})
    assert stored["level"] == 3 and len(stored[checkpoint.RECORD_SHA]) == 64
    back = checkpoint.read_record(path, expect={"level": 3})
    assert back["acc"] == 0.25 and back["w"] == [1, 2] and np.isnan(back["x"]) and checkpoint.RECORD_SHA not in back
    doc = json.loads(path.read_text())
    doc["acc"] = 0.123  # a hand edit that keeps valid JSON
    path.write_text(json.dumps(doc))
    with pytest.raises(checkpoint.RecordError, match=rf"^{path}: its contents do not match .*; delete me$"):
        checkpoint.read_record(path, hint="; delete me")


def test_record_identity_is_checked(tmp_path):
    path = tmp_path / "r.json"
    checkpoint.write_record(path, {"acc": 0.5}, {"level": 2, "seed": 0})
    with pytest.raises(checkpoint.RecordError, match=r"records level=2 where level=3 belongs"):
        checkpoint.read_record(path, expect={"level": 3})
    with pytest.raises(checkpoint.RecordError, match=r"records seed=0 where seed=1 belongs"):
        checkpoint.read_record(path, expect={"level": 2, "seed": 1})
    with pytest.raises(ValueError, match="says level=2 but is stored as level=4"):
        checkpoint.write_record(path, {"level": 2}, {"level": 4})


def test_an_old_record_without_checksum_is_accepted_with_a_warning_but_its_identity_checked(tmp_path, caplog):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"level": 1, "acc": 0.5}))
    assert checkpoint.read_record(path, expect={"level": 1, "seed": 7}) == {"level": 1, "acc": 0.5}
    assert caplog.text.count("written before records carried checksums") == 1
    (tmp_path / "old2.json").write_text(json.dumps({"level": 2}))
    checkpoint.read_record(path)
    checkpoint.read_record(tmp_path / "old2.json")  # another old record of the same folder: no second warning
    assert caplog.text.count("written before records carried checksums") == 1
    with pytest.raises(checkpoint.RecordError, match="records level=1 where level=2 belongs"):
        checkpoint.read_record(path, expect={"level": 2})


def test_a_checkpoint_without_a_recorded_sha_is_refused(tmp_path):
    sha = checkpoint.save(tmp_path / "ck", {"a": np.arange(3.0)})
    assert checkpoint.restore_recorded(tmp_path / "ck", {"a": np.zeros(3)}, {"checkpoint_sha256": sha})["a"][2] == 2
    with pytest.raises(ValueError, match=r"holds no checkpoint_sha256 .* cannot be verified; delete it"):
        checkpoint.restore_recorded(tmp_path / "ck", {"a": np.zeros(3)}, {}, hint="; delete it")


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("rec") / "imp"
    imp_exp.train_and_evaluate({**SMALL, "levels": 2}, wd)
    return wd


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_imp_levels_carry_identity_and_checksum(imp_run):
    for k in range(3):
        doc = json.loads((imp_run / f"level_{k}" / "level.json").read_text())
        assert doc["level"] == k and doc["seed"] == 2 and len(doc[checkpoint.RECORD_SHA]) == 64
    assert not list(imp_run.glob("*.partial")) and not (imp_run / checkpoint.LOCK_NAME).exists()
    results = checkpoint.read_record(imp_run / "results.json")
    assert [r["level"] for r in results["levels"]] == [0, 1, 2]


def test_hand_edited_level_is_refused_on_resume_and_on_report(imp_run, tmp_path):
    wd = _copy(imp_run, tmp_path / "edited")
    path = wd / "level_1" / "level.json"
    doc = json.loads(path.read_text())
    doc["test_accuracy"] = 0.123
    path.write_text(json.dumps(doc, indent=2))
    msg = rf"{path}: its contents do not match .*; delete {wd / 'level_1'} to train that level again"
    with pytest.raises(ValueError, match=msg):
        imp_exp.load_levels(wd)  # the reading for reports and the other experiments
    with pytest.raises(ValueError, match=msg):
        imp_exp.train_and_evaluate({**SMALL, "levels": 2}, wd)  # would rewrite results.json / metrics.csv
    assert "0.123" not in (wd / "results.json").read_text() + (wd / "metrics.csv").read_text()


def test_swapped_level_folders_are_refused(imp_run, tmp_path):
    wd = _copy(imp_run, tmp_path / "swapped")
    (wd / "level_1").rename(wd / "tmp")
    (wd / "level_2").rename(wd / "level_1")
    (wd / "tmp").rename(wd / "level_2")
    with pytest.raises(ValueError, match=r"level_1/level.json: records level=2 where level=1 belongs"):
        imp_exp.load_levels(wd)
    with pytest.raises(ValueError, match=r"records level=2 where level=1 belongs"):
        imp_exp.train_and_evaluate({**SMALL, "levels": 3}, wd)


def test_a_level_without_checkpoint_sha_is_not_extended_from(imp_run, tmp_path):
    wd = _copy(imp_run, tmp_path / "nosha")
    path = wd / "level_2" / "level.json"
    doc = json.loads(path.read_text())
    doc.pop("checkpoint_sha256")
    path.write_text(json.dumps(doc))  # the record's own checksum no longer matches
    with pytest.raises(ValueError, match="its contents do not match"):
        imp_exp.train_and_evaluate({**SMALL, "levels": 3}, wd)
    doc.pop(checkpoint.RECORD_SHA)  # as an older version wrote it: no checksums at all
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"holds no checkpoint_sha256 .* delete {wd / 'level_2'} to train"):
        imp_exp.train_and_evaluate({**SMALL, "levels": 3}, wd)
    assert not (wd / "level_3").exists()


def test_a_corrupt_analysis_record_is_recomputed(imp_run, tmp_path, caplog):
    wd = _copy(imp_run, tmp_path / "ana")
    first = imp_exp.run_analyses(wd, ["overlap"])
    path = wd / "analysis.json"
    doc = json.loads(path.read_text())
    doc["levels"][1]["overlap"]["previous"]["observed"]["overall"]["jaccard"] = 0.999
    path.write_text(json.dumps(doc))
    again = imp_exp.run_analyses(wd, ["overlap"])
    assert "recomputing it" in caplog.text
    assert again == first  # the edited value is gone: recomputed from the checkpoints


def test_interrupted_level_leaves_no_partial_level(imp_run, tmp_path, monkeypatch):
    """A crash inside the checkpoint write leaves ``level_k.partial`` (never ``level_k``); a rerun redoes it."""
    wd = _copy(imp_run, tmp_path / "crash")
    real = checkpoint.save

    def crash(path, tree):
        real(path, tree)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        imp_exp.train_and_evaluate({**SMALL, "levels": 3}, wd)
    assert imp.finished_levels(wd) == [0, 1, 2] and (wd / "level_3.partial").exists()
    assert not (wd / checkpoint.LOCK_NAME).exists()  # released on the way out
    monkeypatch.setattr(checkpoint, "save", real)
    res = imp_exp.train_and_evaluate({**SMALL, "levels": 3}, wd)
    assert [r["level"] for r in res["levels"]] == [0, 1, 2, 3] and not (wd / "level_3.partial").exists()


# ----------------------------------------------------------------------------------------------- lock
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    wd = tmp_path / "wd"
    with checkpoint.workdir_lock(wd) as lock:
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and "UTC" in held["since"]
        with pytest.raises(ValueError, match=rf"^workdir={wd} is in use by another run \(pid {os.getpid()} on host "
                                             rf".*, since .* UTC\); .* delete {lock}\)$"):
            with checkpoint.workdir_lock(wd):
                pass
    assert not wd.exists()  # created by the lock and left empty: removed
    wd.mkdir()
    (wd / checkpoint.LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                       "since": "2026-01-01 00:00:00 UTC"}))
    with checkpoint.workdir_lock(wd) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the lock of a run that is gone" in capsys.readouterr().err
    assert wd.exists() and not (wd / checkpoint.LOCK_NAME).exists()
    (wd / checkpoint.LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "since": "x"}))
    with pytest.raises(ValueError, match="in use by another run .*on host elsewhere"):  # cannot tell: refused
        with checkpoint.workdir_lock(wd):
            pass


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with checkpoint.workdir_lock(tmp_path):
            raise RuntimeError
    assert not (tmp_path / checkpoint.LOCK_NAME).exists()


TINY = {
    "filter_prune": (filter_prune.run, {"dataset": "digits", "model": "vgg", "vgg_cfg": ["4", "M", "6"]}),
    "merge": (merge.run, {"dataset": "digits", "model": "mlp", "hidden": ["8"]}),
    "oneshot": (oneshot.run, {"dataset": "digits", "model": "mlp", "hidden": ["8"]}),
    "lrp_toy": (lrp_toy.run, {"datasets": ["moons"]}),
    "imp": (imp_exp.train_and_evaluate, SMALL),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_experiment_refuses_a_held_workdir_and_a_file(name, tmp_path):
    run, config = TINY[name]
    wd = tmp_path / "wd"
    with checkpoint.workdir_lock(wd):
        with pytest.raises(ValueError, match=rf"workdir={wd} is in use by another run \(pid {os.getpid()}"):
            run(config, wd)
    assert not wd.exists()
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match=rf"^workdir={f}: is an existing file, not a directory; give --workdir"):
        run(config, f)
    assert f.read_text() == "x"


def test_similarity_refuses_a_held_workdir(imp_run, tmp_path):
    wd = tmp_path / "sim"
    with checkpoint.workdir_lock(wd):
        with pytest.raises(ValueError, match="is in use by another run"):
            similarity.run({"imp_workdir": str(imp_run), "metrics": ["linear_cka"], "num_inputs": 50}, wd)


# ----------------------------------------------------------------------------------------------- CLI, SIGINT
def _start(wd: Path, *extra: str, delay: float = 0.0, release: Path | None = None) -> subprocess.Popen:
    """``experiments.imp`` on digits in a subprocess with Ctrl-C's default handling restored (pytest-xdist workers
    ignore SIGINT, and a child would inherit that); ``delay``/``release``: the save hook of ``jaxprune.checkpoint``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(checkpoint.SAVE_DELAY_ENV, None)
    env.pop(checkpoint.SAVE_RELEASE_ENV, None)
    if delay:
        env[checkpoint.SAVE_DELAY_ENV] = str(delay)
    if release is not None:
        env[checkpoint.SAVE_RELEASE_ENV] = str(release)
    args = ["--flagfile=experiments/configs/quickstart.cfg", f"--workdir={wd}", "--training_steps=4",
            "--branch=none", *extra]
    return subprocess.Popen([sys.executable, "-m", "experiments.imp", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.slow
def test_cli_second_run_refused_and_sigint_mid_checkpoint_is_one_line(tmp_path):
    """Run A sleeps inside its level-0 save (test hook); run B in the same workdir is refused naming A; SIGINT to A
    mid-checkpoint: one line, exit 130, level 0 whole and verified; the same command then resumes and finishes."""
    wd = tmp_path / "wd"
    release = tmp_path / "release"  # A's level-0 save waits (up to 600 s) until the test creates this file
    a = _start(wd, "--levels=1", delay=600, release=release)
    _wait_for(lambda: (wd / "level_0.partial").exists(), a)
    b = subprocess.run([sys.executable, "-m", "experiments.imp", f"--workdir={wd}", "--dataset=digits",
                        "--model=mlp", "--hidden=8"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert b.returncode == 2
    last = b.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: workdir={wd} is in use by another run (pid {a.pid} on host ")
    a.send_signal(signal.SIGINT)
    time.sleep(2.0)  # the interrupt arrives while the save is still in progress
    release.touch()
    _, err = a.communicate(timeout=300)
    assert a.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err and err.count("\n") < 40
    assert imp.finished_levels(wd) == [0] and not (wd / "level_0.partial").exists()
    assert not (wd / checkpoint.LOCK_NAME).exists()
    c = _start(wd, "--levels=1")
    out, err = c.communicate(timeout=300)
    assert c.returncode == 0, err[-3000:]
    assert "levels [0] already finished" in err and imp.finished_levels(wd) == [0, 1]
    assert imp_exp.load_levels(wd)[2][0]["level"] == 0


@pytest.mark.slow
def test_cli_sigint_between_levels_keeps_finished_levels(tmp_path):
    wd = tmp_path / "wd"
    # every save sleeps 0.5 s (test hook), so the 30 levels outlast the signal even when every program comes from
    # the persistent compilation cache (without it the run once finished first: exit 0)
    a = _start(wd, "--levels=30", delay=0.5)
    _wait_for(lambda: (wd / "level_1" / "level.json").exists(), a)
    a.send_signal(signal.SIGINT)
    _, err = a.communicate(timeout=300)
    assert a.returncode == 130 and err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err
    done = imp.finished_levels(wd)
    assert done[:2] == [0, 1] and not list(wd.glob("*.partial")) and not (wd / checkpoint.LOCK_NAME).exists()
    recs = [imp.read_level(wd, k, 0) for k in done]  # every level left is whole and verified
    assert [r["level"] for r in recs] == done
