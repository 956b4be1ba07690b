"""Probe of stored records, the workdir lock and interrupts (issue 28): corrupt, swap, lock and interrupt workdirs
of tiny runs as a user could, and count the outcomes. Every case must end ``refused`` (one line naming the file or
the argument), ``recomputed`` (a derived record, rebuilt with the right value) or ``ok`` (an interrupt that keeps
every finished level whole and resumes); ``SILENT`` (a wrong number accepted) and ``FAILED`` (a traceback, a hang,
another exit code) are the bugs this probe looks for.

    PYTHONPATH=. JAXPRUNE_DATA_DIR=... python benchmarks/probe_records.py [--no-cli]
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from absl import logging  # noqa: E402

from experiments import filter_prune, imp as imp_exp, lrp_toy, merge, oneshot, similarity  # noqa: E402
from jaxprune import checkpoint, imp  # noqa: E402

logging.set_verbosity(logging.ERROR)
IMP = dict(dataset="digits", model="mlp", hidden=["12"], optimizer="momentum", lr=0.05, schedule="constant",
           milestones=[], training_steps="4", batch_size=64, prune_fraction=0.5, seeds=["0"], levels=2)
MERGE = dict(dataset="digits", model="mlp", hidden=["16", "8"], normalize="none", lr=0.05, weight_decay=0.0,
             schedule="constant", milestones=[], training_steps="5", batch_size=32, sparsity=["0.5"],
             criteria=["l2"], seeds=["0", "1"])
FILTER = dict(dataset="digits", model="vgg", vgg_cfg=["4", "M", "6"], normalize="none", optimizer="momentum",
              lr=0.05, weight_decay=0.0, schedule="constant", milestones=[], training_steps="3", batch_size=64,
              finetune_steps="2", prune_fraction=0.25, max_rounds=1, max_train_examples=256, max_test_examples=64)
LRP = {"datasets": ["moons"], "num_train": 64, "hidden": ["8", "8"], "training_steps": "3", "batch_size": 32,
       "samples_per_class": ["1"], "seeds": ["0"], "n_prune": 4, "plot_n": 1, "criteria": ["weight"]}
ONESHOT = dict(dataset="digits", model="mlp", hidden=["12"], training_steps="3", batch_size=64,
               sparsity=["0", "0.5"], seeds=["0"], max_train_examples=256, max_test_examples=64)
RESULTS: list[tuple[str, str, str]] = []


def case(group: str, name: str, fn) -> None:
    """Run one case; ``fn`` returns the outcome word (and an error it expected is ``refused``)."""
    try:
        out, why = fn(), ""
    except ValueError as e:
        msg = str(e)
        out, why = ("refused", msg) if "\n" not in msg else ("FAILED", "multi-line: " + msg[:200])
    except Exception as e:  # noqa: BLE001 -- anything else is a finding
        out, why = "FAILED", f"{type(e).__name__}: {e}"[:300]
    RESULTS.append((group, name, out))
    print(f"{group:10s} {name:58s} {out:10s} {why[:120]}", flush=True)


def edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def fresh(base: Path, name: str) -> Path:
    dst = base.parent / name
    shutil.copytree(base, dst)
    return dst


def swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def imp_cases(root: Path) -> None:
    base = root / "imp"
    imp_exp.train_and_evaluate(IMP, base)
    more = {**IMP, "levels": 3}

    def edited(report):
        wd = fresh(base, f"edited_{report}")
        edit(wd / "level_1" / "level.json", lambda d: d.update(test_accuracy=0.123))
        if report:
            imp_exp.load_levels(wd)
        else:
            imp_exp.train_and_evaluate(IMP, wd)
        return "SILENT"

    case("imp", "level.json test_accuracy edited, rerun", lambda: edited(False))
    case("imp", "level.json test_accuracy edited, load_levels", lambda: edited(True))

    def swapped():
        wd = fresh(base, "swapped")
        swap(wd / "level_1", wd / "level_2")
        imp_exp.load_levels(wd)
        return "SILENT"

    case("imp", "level_1 and level_2 swapped", swapped)

    def copied():
        wd = fresh(base, "copied")
        shutil.copy(wd / "level_1" / "level.json", wd / "level_2" / "level.json")
        imp_exp.train_and_evaluate(more, wd)
        return "SILENT"

    case("imp", "level_1/level.json copied over level_2's", copied)

    def no_sha(legacy):
        wd = fresh(base, f"nosha_{legacy}")
        edit(wd / "level_2" / "level.json",
             lambda d: [d.pop("checkpoint_sha256")] + ([d.pop(checkpoint.RECORD_SHA)] if legacy else []))
        imp_exp.train_and_evaluate(more, wd)
        return "SILENT"

    case("imp", "checkpoint_sha256 removed (record checksum kept)", lambda: no_sha(False))
    case("imp", "checkpoint_sha256 and record checksum removed (old)", lambda: no_sha(True))

    def flipped():
        wd = fresh(base, "flipped")
        data = max((p for p in (wd / "level_2" / "checkpoint").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        imp_exp.train_and_evaluate(more, wd)
        return "SILENT"

    case("imp", "a byte of level_2's checkpoint flipped", flipped)

    def config_edited():
        wd = fresh(base, "config")
        edit(wd / "config.json", lambda d: d.update(lr=0.5))
        imp_exp.train_and_evaluate({**IMP, "lr": 0.5}, wd)
        return "SILENT"

    case("imp", "config.json lr edited to match new flags", config_edited)
    imp_derived_cases(root, base)


def imp_derived_cases(root: Path, base: Path) -> None:
    """Derived records of the IMP run in ``base`` (rebuilt, not refused), and a reader of its levels."""

    def derived(name):
        wd = fresh(base, f"derived_{name.replace('.', '_')}")
        truth = imp.read_level(wd, 1)["test_accuracy"]
        if name == "results.json":
            edit(wd / name, lambda d: d["levels"][1].update(test_accuracy=0.123))
        else:
            text = (wd / name).read_text().replace(repr(truth), "0.123")
            (wd / name).write_text(text)
        imp_exp.train_and_evaluate(IMP, wd)
        res = checkpoint.read_record(wd / "results.json")["levels"][1]["test_accuracy"]
        rows = list(csv.DictReader(open(wd / "metrics.csv")))
        return "recomputed" if res == truth and float(rows[1]["test_accuracy"]) == truth else "SILENT"

    case("imp", "results.json edited (derived)", lambda: derived("results.json"))
    case("imp", "metrics.csv edited (derived)", lambda: derived("metrics.csv"))

    def analysis_edited():
        wd = fresh(base, "analysis")
        first = imp_exp.run_analyses(wd, ["overlap"])
        edit(wd / "analysis.json", lambda d: d["levels"][1]["overlap"]["previous"]["observed"]["overall"]
             .update(jaccard=0.999))
        return "recomputed" if imp_exp.run_analyses(wd, ["overlap"]) == first else "SILENT"

    case("imp", "analysis.json edited (derived)", analysis_edited)

    def similarity_swapped():
        wd = fresh(base, "sim")
        swap(wd / "level_1", wd / "level_2")
        similarity.run({"imp_workdir": str(wd), "metrics": ["linear_cka"], "num_inputs": 50}, root / "sim_out")
        return "SILENT"

    case("imp", "similarity on a workdir with swapped levels", similarity_swapped)


def other_cases(root: Path) -> None:
    mbase = root / "merge"
    merge.run(MERGE, mbase)

    def merge_case(how):
        wd = fresh(mbase, f"merge_{how}")
        if how == "edit":
            edit(wd / "seed_0" / "trained.json", lambda d: d.update(train_loss=0.0))
        else:
            swap(wd / "seed_0", wd / "seed_1")
        merge.run(MERGE, wd)
        return "SILENT"

    case("merge", "seed_0/trained.json edited", lambda: merge_case("edit"))
    case("merge", "seed_0 and seed_1 swapped", lambda: merge_case("swap"))

    fbase = root / "filter"
    filter_prune.run(FILTER, fbase)

    def filter_case():
        wd = fresh(fbase, "filter_edit")
        edit(wd / "seed_0" / "round_1" / "round.json", lambda d: d.update(accuracy_after_finetune=0.99))
        filter_prune.run(FILTER, wd)
        return "SILENT"

    case("filter", "round_1/round.json edited", filter_case)

    lbase = root / "lrp"
    lrp_toy.run(LRP, lbase)

    def lrp_case():
        wd = fresh(lbase, "lrp_edit")
        edit(wd / "moons" / "train.json", lambda d: d.update(final_train_loss=0.0))
        lrp_toy.run(LRP, wd)
        return "SILENT"

    case("lrp_toy", "moons/train.json edited", lrp_case)

    obase = root / "oneshot"
    first = oneshot.run(ONESHOT, obase)

    def oneshot_case():
        wd = fresh(obase, "oneshot_edit")
        edit(wd / "seed_0.json", lambda d: d.update(dense_accuracy=0.01))
        again = oneshot.run(ONESHOT, wd)
        return "recomputed" if again["per_seed"][0]["dense_accuracy"] == first["per_seed"][0]["dense_accuracy"] \
            else "SILENT"

    case("oneshot", "seed_0.json edited (derived table)", oneshot_case)


RUNS = {"imp": (imp_exp.train_and_evaluate, IMP), "merge": (merge.run, MERGE), "oneshot": (oneshot.run, ONESHOT),
        "filter_prune": (filter_prune.run, FILTER), "lrp_toy": (lrp_toy.run, LRP)}


def lock_cases(root: Path) -> None:
    for name, (run, cfg) in RUNS.items():
        def held(run=run, cfg=cfg, name=name):
            with checkpoint.workdir_lock(root / f"held_{name}"):
                run(cfg, root / f"held_{name}")
            return "SILENT"

        def a_file(run=run, cfg=cfg, name=name):
            (root / f"file_{name}").write_text("x")
            run(cfg, root / f"file_{name}")
            return "SILENT"

        case("lock", f"{name}: workdir held by a live run", held)
        case("lock", f"{name}: --workdir names a file", a_file)

    def sim_held():
        with checkpoint.workdir_lock(root / "held_sim"):
            similarity.run({"imp_workdir": str(root / "imp"), "metrics": ["linear_cka"]}, root / "held_sim")
        return "SILENT"

    case("lock", "similarity: workdir held by a live run", sim_held)

    def stale(host):
        wd = root / f"stale_{host}"
        wd.mkdir()
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        (wd / checkpoint.LOCK_NAME).write_text(json.dumps({"pid": p.pid, "host": host, "since": "then"}))
        imp_exp.train_and_evaluate({**IMP, "levels": 0}, wd)
        return "ok" if not (wd / checkpoint.LOCK_NAME).exists() and imp.finished_levels(wd) == [0] else "FAILED"

    case("lock", "stale lock of a dead pid on this host: taken over", lambda: stale(socket.gethostname()))
    case("lock", "lock of a pid on another host: refused", lambda: stale("elsewhere"))


def cli(wd: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(checkpoint.SAVE_DELAY_ENV, None)
    if delay:
        env[checkpoint.SAVE_DELAY_ENV] = str(delay)
    return subprocess.Popen([sys.executable, "-m", "experiments.imp", "--flagfile=experiments/configs/quickstart.cfg",
                             f"--workdir={wd}", "--training_steps=4", "--branch=none", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=300.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None or time.time() - t0 > timeout:
            raise RuntimeError(f"run ended or timed out before the interrupt point: {proc.communicate()[1][-500:]}")
        time.sleep(0.1)


def interrupted(wd: Path, proc, args: list[str], levels: int) -> str:
    """Outcome of a SIGINT-ed run: one line, exit 130, every level whole, the same command (``args``, run without
    the test hook's delay) resumes to the end (``levels``: the last level it must hold then)."""
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    if proc.returncode != 130 or lines[-1] != "interrupted; rerun the same command to resume" or "Traceback" in err:
        return f"FAILED (exit {proc.returncode}, {len(lines)} lines)"
    done = imp.finished_levels(wd)
    [imp.read_level(wd, k, 0) for k in done]  # each verified (refused if not whole)
    if list(wd.glob("*.partial")) or (wd / checkpoint.LOCK_NAME).exists():
        return "FAILED (leftovers)"
    again = cli(wd, *args)
    again.communicate(timeout=600)
    if again.returncode != 0 or imp.finished_levels(wd) != list(range(levels + 1)):
        return "FAILED (resume)"
    return f"ok (interrupted with levels {done} finished; resumed to {levels})"


def cli_cases(root: Path) -> None:
    def concurrent():
        wd = root / "cli_lock"
        a = cli(wd, "--levels=1", delay=15)
        wait_for(lambda: (wd / "level_0.partial").exists(), a)
        b = subprocess.run([sys.executable, "-m", "experiments.imp", f"--workdir={wd}", "--dataset=digits"], cwd=REPO,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        a.send_signal(signal.SIGINT)
        a.communicate()
        last = b.stderr.strip().splitlines()[-1]
        ok = b.returncode == 2 and f"(pid {a.pid} on host" in last and "Traceback" not in b.stderr
        return "refused" if ok else "FAILED"

    case("cli", "second run on a live lock", concurrent)

    def sigint(where):
        wd = root / f"cli_sigint_{where}"
        if where == "mid-checkpoint":
            args, levels = ["--levels=1"], 1
            a = cli(wd, *args, delay=10)
            wait_for(lambda: (wd / "level_0.partial").exists(), a)
        elif where == "training level 0":
            args, levels = ["--levels=0", "--training_steps=60ep"], 0
            a = cli(wd, *args)
            wait_for(lambda: (wd / "config.json").exists(), a)
            time.sleep(1)
        else:
            args, levels = ["--levels=2"], 2
            a = cli(wd, *args, delay=3)  # slow saves: level 2 is not finished when the interrupt comes
            wait_for(lambda: (wd / "level_1" / "level.json").exists(), a)
        a.send_signal(signal.SIGINT)
        return interrupted(wd, a, args, levels)

    for where in ("mid-checkpoint", "training level 0", "after level 1"):
        case("interrupt", f"SIGINT {where}", lambda w=where: sigint(w))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="probe_records_"))
    t0 = time.time()
    imp_cases(root)
    other_cases(root)
    lock_cases(root)
    if "--no-cli" not in sys.argv:
        cli_cases(root)
    counts: dict[str, int] = {}
    for _, _, out in RESULTS:
        word = out.split()[0]
        counts[word] = counts.get(word, 0) + 1
    print(f"\n{len(RESULTS)} cases in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if counts.get("SILENT") or counts.get("FAILED") else 0)


if __name__ == "__main__":
    main()
