"""The experiment entry points as a user runs them: flagfiles, exit codes, one-line errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "experiments.imp", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_quickstart_flagfile_runs_and_resumes(tmp_path):
    wd = tmp_path / "qs"
    args = ["--flagfile=experiments/configs/quickstart.cfg", f"--workdir={wd}", "--levels=1", "--training_steps=20"]
    p = _cli(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "level  1  density 0.6000" in p.stdout
    res = json.loads((wd / "results.json").read_text())
    assert res["finished"] and res["config"]["dataset"] == "digits"
    p2 = _cli(*args)
    assert p2.returncode == 0 and "already finished" in p2.stderr


def test_bad_flag_value_is_one_clear_line(tmp_path):
    p = _cli("--lr=-1", f"--workdir={tmp_path / 'x'}")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == "error: lr=-1.0: expected a positive finite learning rate"
    p = _cli("--rewind=sideways", f"--workdir={tmp_path / 'x'}")
    assert p.returncode != 0 and "rewind" in p.stderr and "Traceback" not in p.stderr


EXPERIMENT_OF_CONFIG = {"quickstart": "imp", "lenet300": "imp", "lenet5": "imp", "conv4": "imp",
                        "filter_prune": "filter_prune", "lrp_toy": "lrp_toy", "merge": "merge", "oneshot": "oneshot",
                        "similarity": "similarity", "sparse_train": "sparse_train",
                        "lm_prune": "lm_prune", "head_prune": "head_prune"}


def test_every_shipped_config_names_only_its_experiments_flags_and_choices():
    """A typo in a shipped flagfile (unknown flag, value outside an enum) would only show when a user runs it."""
    import importlib

    configs = sorted((REPO / "experiments" / "configs").glob("*.cfg"))
    assert len(configs) >= 10
    for cfg in configs:
        module = next(m for prefix, m in EXPERIMENT_OF_CONFIG.items() if cfg.stem.startswith(prefix))
        spec = {row[0]: row for row in importlib.import_module(f"experiments.{module}").SPEC}
        for line in cfg.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            assert line.startswith("--") and "=" in line, (cfg.name, line)
            name, value = line[2:].split("=", 1)
            assert name in spec, f"{cfg.name}: --{name} is not a flag of experiments.{module}"
            if len(spec[name]) > 3:
                assert value in spec[name][3], f"{cfg.name}: --{name}={value} not in {spec[name][3]}"


@pytest.mark.slow
def test_flag_errors_name_the_flag_and_leave_no_workdir(tmp_path):
    wd = tmp_path / "refused"
    small = ["--model=mlp", "--hidden=8", "--training_steps=5", "--levels=1", f"--workdir={wd}"]
    p = _cli(*small, "--hidden=a")
    assert p.returncode == 2 and not wd.exists()
    assert p.stderr.strip().splitlines()[-1] == "error: hidden='a': expected comma-separated integers (e.g. 300,100)"
    p = _cli(*small, "--rewind=finetune", "--schedule=cosine")
    assert p.returncode == 2 and not wd.exists()
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --rewind=finetune") and "--schedule=cosine" in last and "--finetune_lr" in last
    p = _cli(*small, "--rewind=finetune", "--schedule=cosine", "--finetune_lr=0.05")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((wd / "config.json").read_text())["finetune_lr"] == 0.05


@pytest.mark.slow
def test_merge_rerun_with_other_training_settings_is_refused_in_one_line(tmp_path):
    """Issue #17's reproduction: a rerun with --lr=0.5 --training_steps=50 in a workdir trained at lr 0.05 for 5
    steps is refused (exit 2, naming both settings), not answered with the old network under the new settings."""
    wd = tmp_path / "merge"
    args = ["--dataset=digits", "--model=mlp", "--hidden=16,8", "--schedule=constant", "--milestones=",
            "--weight_decay=0", "--batch_size=32", "--seeds=0", "--sparsity=0.5", "--criteria=l2", f"--workdir={wd}"]

    def merge(*extra):
        return subprocess.run([sys.executable, "-m", "experiments.merge", *args, *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    p = merge("--lr=0.05", "--training_steps=5")
    assert p.returncode == 0, p.stderr[-2000:]
    results = (wd / "results.json").read_text()
    p = merge("--lr=0.5", "--training_steps=50")
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "lr: 0.05 -> 0.5" in last and "training_steps: '5' -> '50'" in last
    assert (wd / "results.json").read_text() == results  # nothing recorded under the new settings


# Random CIFAR-shaped data (32×32×3, 10 classes) in place of TFDS CIFAR-10, which these machines do not have: the
# shipped CIFAR flagfiles are run end to end as a user runs them, with short schedules.
_CIFAR_SHAPED = """
import runpy, sys
import numpy as np
from jaxprune import data
real = data.load
def load(name, split, data_dir=None, *, seed=0, **kw):
    if name != "cifar10":
        return real(name, split, data_dir, seed=seed, **kw)
    n = 256 if split == "train" else 64
    rng = np.random.default_rng(0 if split == "train" else 1)
    return data.Dataset(rng.random((n, 32, 32, 3), np.float32), rng.integers(0, 10, n).astype(np.int32), 10)
data.load = load
sys.argv = sys.argv[1:]
runpy.run_module("experiments." + sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _cifar_shaped_run(experiment: str, cfg: str, wd, *flags: str) -> dict:
    p = subprocess.run([sys.executable, "-c", _CIFAR_SHAPED, experiment, f"--flagfile=experiments/configs/{cfg}",
                        f"--workdir={wd}", *flags], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["finished"] and res["config"]["dataset"] == "cifar10"
    return res


@pytest.mark.slow
def test_conv4_cifar10_config_runs_end_to_end(tmp_path):
    _cifar_shaped_run("imp", "conv4_cifar10.cfg", tmp_path, "--training_steps=2", "--levels=1")
    level = json.loads((tmp_path / "level_1" / "level.json").read_text())
    # Frankle & Carbin's Conv-4: 3×3 convs 64, 64, 128, 128 (two 2×2 pools), dense 256, 256; the output layer is
    # not pruned
    convs = 3 * 3 * (3 * 64 + 64 * 64 + 64 * 128 + 128 * 128)
    assert level["prunable_weights"] == convs + 8 * 8 * 128 * 256 + 256 * 256
    assert level["kept_weights"] == level["prunable_weights"] - math.ceil(0.2 * level["prunable_weights"] - 1e-9)


@pytest.mark.slow
def test_filter_prune_resnet20_cifar10_config_runs_end_to_end(tmp_path):
    res = _cifar_shaped_run("filter_prune", "filter_prune_resnet20_cifar10.cfg", tmp_path, "--training_steps=2",
                            "--finetune_steps=1", "--max_rounds=1")
    assert res["rounds"][0]["params"] == 272474  # ResNet-20 (He et al. 2016, Table 6: 0.27M)
    assert res["rounds"][1]["widths"] == {f"block{s}_{b}/conv_0": w - math.ceil(0.2 * w)
                                         for s, w in enumerate((16, 32, 64)) for b in range(3)}


@pytest.mark.slow
def test_merge_vgg16_cifar10_config_runs_end_to_end(tmp_path):
    res = _cifar_shaped_run("merge", "merge_vgg16_cifar10.cfg", tmp_path, "--training_steps=1", "--criteria=l2")
    cfg = [int(w) for w in res["config"]["pruned_cfg"] if w != "M"]
    for run in res["seeds"][0]["runs"]:
        assert list(run["widths"].values()) == cfg
