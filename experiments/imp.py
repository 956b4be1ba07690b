"""Iterative magnitude pruning with rewinding: ``python -m experiments.imp --flagfile=experiments/configs/X.cfg``.

Writes to ``--workdir``: ``config.json``, ``level_k/`` (orbax checkpoint + ``level.json``), ``results.json``,
``metrics.csv``, ``accuracy_vs_density.png``, ``layer_densities.png``. Re-running the same command resumes after
the last finished level; a finished run is reported and skipped.

``--analyses=similarity,overlap,instability`` (any subset; default none) analyses every finished level and writes
``analysis.json`` (one record per level), ``analysis_timing.json`` and ``analysis_*.png`` (see
:func:`run_analyses`); like the levels, a finished level's analysis is not recomputed, unless its settings or the
checkpoints it was computed from changed.

Importable without side effects: :func:`train_and_evaluate` takes an :class:`ImpSettings` or a config dict (keys =
flag names, defaults in ``DEFAULTS``); :func:`load_levels` reads a finished workdir back for analysis (similarity,
LRP, …). They live in :mod:`experiments.imp_run` (the library code in :mod:`jaxprune.runs`); this module is the
command line.

``--seeds=s,s+1,…,s+K-1`` (or ``--seeds=s:s+K``) trains the K seeds as one vmapped program (replicas);
``results.json`` then holds the mean over replicas under the usual keys, ``<key>_std`` (ddof = 1) and the
per-replica records under ``replicas``. Training is
data-parallel over all devices (``--batch_size`` must be a multiple of the device count); for several hosts see
:mod:`jaxprune.distributed` (``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""
from __future__ import annotations

from pathlib import Path

from absl import app, logging

from experiments import common
from experiments.imp_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    ADDED_LATER, ANALYSES, ANALYSIS_FLAGS, DEFAULTS, RENAMED, SPEC, VOLATILE, Built, ImpSettings, analysis_settings,
    build, canonical, instability_data_key, load_levels, plot_analyses, replica_record, run_analyses, seeds_of,
    stored_config, trained_seeds, train_and_evaluate, unused)
from jaxprune import checkpoint, distributed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_orbax()
    config = common.config_from_flags(SPEC, RENAMED)
    distributed.initialize(config["coordinator_address"], config["num_processes"], config["process_id"],
                           auto=config["distributed"])
    results = common.run_tolerating_flagfile(train_and_evaluate, config, SPEC, common.flagfile_only(SPEC))
    print(f"results: {Path(config['workdir']) / 'results.json'}")
    for r in results["levels"]:
        std = lambda x: f" ± {x['test_accuracy_std']:.4f}" if "test_accuracy_std" in x else ""
        br = f"  {r['branch']['name']} {r['branch']['test_accuracy']:.4f}{std(r['branch'])}" if "branch" in r else ""
        print(f"level {r['level']:2d}  density {r['density']:.4f}  test accuracy {r['test_accuracy']:.4f}{std(r)}{br}")
    if config["analyses"]:
        doc = checkpoint.read_record(Path(config["workdir"]) / "analysis.json")
        print(f"analysis: {Path(config['workdir']) / 'analysis.json'}")
        for lv in doc["levels"]:
            print(f"level {lv['level']:2d}  density {lv['density']:.4f}  " + _summary_line(lv))
    logging.info("done")


def _summary_line(lv: dict) -> str:
    parts = []
    if "instability" in lv:
        parts.append(f"barrier {100 * lv['instability']['barrier']:.2f} pp")
    if "overlap" in lv and lv["overlap"]["between_replicas"] is not None:
        o = lv["overlap"]["between_replicas"]
        parts.append(f"replica Jaccard {o['observed']['overall']['jaccard']:.3f} "
                     f"(random {o['random']['overall']['jaccard']:.3f})")
    if "similarity" in lv:
        m = lv["similarity"]["settings"]["metrics"][0]
        vals = lv["similarity"]["metrics"][m]
        parts.append(f"{m} " + " ".join(f"{n}={v:.3f}" for n, v in vals.items() if v is not None))
    return "  ".join(parts)


if __name__ == "__main__":
    common.define_flags(SPEC, RENAMED)
    common.run_main(main)
