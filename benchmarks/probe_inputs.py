"""Bad-input probe (issue 28): bad library calls and CLI inputs as an outside user makes them, each classified as

* ``one-line``: refused with one line that names the argument / flag / file (CLI: exit 2, ``error: …``),
* ``vague``: refused in one line that does not name it,
* ``traceback``: an exception from deep inside (library: a multi-line or foreign error; CLI: a Python traceback),
* ``accepted``: no error — the silent case (for ``expect="ok"`` cases, where the right outcome is a run, the run's
  result is checked instead: ``ok``, ``wrong``, or ``refused``).

``python benchmarks/probe_inputs.py [--cli] [--library]`` (both by default) prints one row per case and the counts.
Small and on the embedded digits data: about 30 s for the library part and 15 s per CLI case on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def classify_exception(e: BaseException | None, name: str) -> str:
    """``name``: a regular expression the message must match to name the argument (``r"\\bkey="``)."""
    if e is None:
        return "accepted"
    msg = str(e).strip()
    if "\n" in msg:
        return "traceback"
    return "one-line" if re.search(name, msg) else "vague"


def library_cases() -> list[tuple[str, str, Callable[[], Any]]]:
    """``(case, the name the error must hold, call)``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import augment, conventions, data, imp, masks, models, structured, train

    p = {"w": jnp.arange(12.0).reshape(4, 3), "v": jnp.ones((2, 3))}
    m, pr = masks.ones_like(p), masks.prunable_leaves(p)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(10)(nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1)))))

    d, te = data.load("digits", "train"), data.load("digits", "test")
    x, y = jnp.asarray(d.images[:256]), jnp.asarray(d.labels[:256])
    xt, yt = jnp.asarray(te.images[:64]), jnp.asarray(te.labels[:64])
    v = models.init(Net(), jax.random.PRNGKey(0), x.shape)
    tx = train.make_optimizer(train.OptimConfig(), 0.1)
    tr, st = train.make_trainer(Net(), tx), train.create_state(v, tx)
    mtx = masks.masked(tx)
    mst = train.create_state(v, mtx)
    big = train.make_optimizer(train.OptimConfig("sgd", 1e6), 1e6)

    def task(**kw):
        base = dict(x_train=x, y_train=y, x_test=xt, y_test=yt, optim=train.OptimConfig("sgd", 0.05), num_steps=16,
                    batch_size=32)
        return imp.Task(Net(), **{**base, **kw})

    def diverged_run():
        r = train.run(train.make_trainer(Net(), big), train.create_state(v, big), x, y, batch_size=32,
                      num_steps=64, data_key=jax.random.PRNGKey(0))
        return r.train_loss

    def diverged_imp():
        return imp.run(task(optim=train.OptimConfig("sgd", 1e6), num_steps=64), imp.ImpConfig(levels=0), None)

    return [
        ("masks.random_prune(0, ...)", r"\bkey=", lambda: masks.random_prune(0, m, pr, 0.5)),
        ("masks.random_like(0, ...)", r"\bkey=", lambda: masks.random_like(0, m, pr)),
        ("imp.random_mask_branch(0, ...)", r"\bkey=", lambda: imp.random_mask_branch(
            0, mtx, "init", masks.ones_like(mst.params), masks.prunable_leaves(mst.params), mst, mst)),
        ("models.init(model, 0, shape)", r"\bkey=", lambda: models.init(Net(), 0, x.shape)),
        ("structured.unit_scores(random, key=7)", r"\bkey=",
         lambda: structured.unit_scores(jnp.ones((5, 3)), "random", key=7)),
        ("augment.random_flip(0, x)", r"\bkey=", lambda: augment.random_flip(0, jnp.ones((2, 4, 4, 1)))),
        ("train.run(data_key=0)", r"\bdata_key=",
         lambda: train.run(tr, st, x, y, batch_size=32, num_steps=1, data_key=0)),
        ("magnitude_prune(fraction='0.5')", r"\bfraction=", lambda: masks.magnitude_prune(p, m, pr, "0.5")),
        ("magnitude_prune(fraction=None)", r"\bfraction=", lambda: masks.magnitude_prune(p, m, pr, None)),
        ("random_prune(fraction=True)", r"\bfraction=",
         lambda: masks.random_prune(jax.random.PRNGKey(0), m, pr, True)),
        ("conventions.n_to_prune('0.5', 10)", r"\bfraction=", lambda: conventions.n_to_prune("0.5", 10)),
        ("imp.ImpConfig(fraction='0.5')", r"\bfraction=", lambda: imp.ImpConfig(fraction="0.5")),
        ("models.build('mlp', hidden=(0,))", r"\bhidden=", lambda: models.build("mlp", 10, hidden=(0,))),
        ("models.build('mlp', hidden=(16, -4))", r"\bhidden=", lambda: models.build("mlp", 10, hidden=(16, -4))),
        ("models.init(MLP((0, 10)))", r"\bfeatures=",
         lambda: models.init(models.MLP((0, 10)), jax.random.PRNGKey(0), (1, 4))),
        ("models.init(VGG((4, 'M', 0)))", r"\bcfg=",
         lambda: models.init(models.VGG((4, "M", 0), 10), jax.random.PRNGKey(0), (1, 8, 8, 1))),
        ("train.run(y shorter than x)", r"^y:", lambda: train.run(tr, st, x, y[:-1], batch_size=32, num_steps=1,
                                                               data_key=jax.random.PRNGKey(0))),
        ("imp.Task(y_train shorter than x_train)", r"^y_train:", lambda: task(y_train=y[:-1])),
        ("imp.run(y_train with label 10, 10 classes)", r"^y_train:",
         lambda: imp.run(task(y_train=y.at[0].set(10)), imp.ImpConfig(levels=0), None)),
        ("imp.run(y_test with label -1)", r"^y_test:",
         lambda: imp.run(task(y_test=yt.at[0].set(-1)), imp.ImpConfig(levels=0), None)),
        ("train.run(sgd lr 1e6)", r"training diverged at step", diverged_run),
        ("imp.run(sgd lr 1e6)", r"training diverged at step", diverged_imp),
    ]


def run_library() -> list[tuple[str, str]]:
    rows = []
    for case, name, call in library_cases():
        try:
            call()
            err = None
        except Exception as e:  # noqa: BLE001 — the probe classifies whatever comes out
            err = e
        rows.append((f"lib  {case}", classify_exception(err, name)))
    return rows


def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PROBE_ROOT", str(ROOT))}
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def classify_cli(r: subprocess.CompletedProcess, name: str) -> str:
    if "Traceback" in r.stderr or r.returncode not in (0, 2):
        return "traceback"
    if r.returncode == 0:
        return "accepted"
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    return "one-line" if last.startswith("error:") and re.search(name, last) else "vague"


def cli_cases(tmp: Path) -> list[tuple[str, str, str, list[str], Callable | None]]:
    """``(case, module, the name the error must hold, args, check)``; ``check(workdir)`` (for the cases that must
    run) says whether the result is right."""
    small = ["--dataset=digits", "--model=mlp", "--hidden=16", "--training_steps=2", "--levels=0"]
    fp = tmp / "filter_prune_wd"
    fp.mkdir()
    (fp / "config.json").write_text(json.dumps({"dataset": "digits", "model": "vgg", "criterion": "l1",
                                                "max_pruned_fraction": 0.9, "prune_fraction": 0.2}))
    listed = tmp / "list_wd"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    broken = tmp / "broken_wd"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    flagfile = tmp / "shared.cfg"
    flagfile.write_text("\n".join(small + ["--seeds=3"]) + "\n")
    seeds_ok = lambda wd: json.loads((wd / "config.json").read_text()).get("seeds") == [3, 4]
    wd = lambda name: f"--workdir={tmp / name}"
    return [
        ("imp --hidden=0", "imp", r"\bhidden=", [*small, "--hidden=0", wd("a")], None),
        ("oneshot --hidden=0", "oneshot", r"\bhidden=",
         ["--dataset=digits", "--hidden=0", "--training_steps=2", wd("b")], None),
        ("filter_prune --vgg_cfg=16,X,32", "filter_prune", r"\bvgg_cfg=",
         ["--dataset=digits", "--model=vgg", "--vgg_cfg=16,X,32", "--training_steps=2", wd("c")], None),
        ("merge --pruned_cfg=2,Y,3", "merge", r"\bpruned_cfg=",
         ["--dataset=digits", "--model=vgg", "--vgg_cfg=4,M,6", "--pruned_cfg=2,Y,3", "--training_steps=2",
          wd("d")], None),
        ("similarity --imp_workdir=<filter_prune workdir>", "similarity",
         r"imp_workdir=.*written by experiments.filter_prune", [f"--imp_workdir={fp}", wd("e")], None),
        ("imp, config.json holding a list", "imp", r"config.json.*delete", [*small, f"--workdir={listed}"], None),
        ("imp, config.json not JSON", "imp", r"config.json.*delete", [*small, f"--workdir={broken}"], None),
        ("imp --optimizer=sgd --lr=1e6", "imp", r"training diverged at step",
         [*small, "--optimizer=sgd", "--lr=1e6", "--training_steps=64", wd("f")], None),
        ("imp --rewind_step=1 (rewind=init)", "imp", r"\brewind_step=", [*small, "--rewind_step=1", wd("g")], None),
        ("imp --schedule=step --milestones=100 (2 steps)", "imp", r"\bmilestones=",
         [*small, "--schedule=step", "--milestones=100", wd("h")], None),
        ("imp --warmup=5 (2 steps)", "imp", r"\bwarmup=", [*small, "--warmup=5", wd("i")], None),
        ("imp --momentum=0.5 (sgd)", "imp", r"\bmomentum=", [*small, "--momentum=0.5", wd("j")], None),
        ("imp --flagfile(--seeds=3) --num_replicas=2", "imp", "", [f"--flagfile={flagfile}", "--num_replicas=2",
                                                                  wd("k")], lambda: seeds_ok(tmp / "k")),
    ]


def run_cli() -> list[tuple[str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for case, module, name, args, check in cli_cases(tmp):
            r = _cli(module, args, tmp)
            if check is not None:  # a case that must run: refusing it is wrong too
                got = ("ok" if check() else "wrong") if r.returncode == 0 else "refused"
            else:
                got = classify_cli(r, name)
            rows.append((f"cli  {case}", got))
            print(f"{case:55s} {got:10s} {r.stderr.strip().splitlines()[-1][:110] if r.stderr.strip() else ''}",
                  flush=True)
    return rows


def main(argv: list[str]) -> None:
    which = {a.lstrip("-") for a in argv} or {"cli", "library"}
    rows = []
    if "library" in which:
        rows += run_library()
        for case, got in rows:
            print(f"{case:60s} {got}", flush=True)
    if "cli" in which:
        rows += run_cli()
    counts: dict[str, int] = {}
    for _, got in rows:
        counts[got] = counts.get(got, 0) + 1
    print("counts:", json.dumps(dict(sorted(counts.items()))), f"({len(rows)} cases)")


if __name__ == "__main__":
    main(sys.argv[1:])
