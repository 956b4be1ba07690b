"""Layer similarity of IMP-pruned networks to the dense one: ``python -m experiments.similarity
--flagfile=experiments/configs/similarity_lenet5_mnist.cfg``.

Reads a finished ``experiments.imp`` workdir, takes the representations (``common.representations``) of a fixed
set of inputs (the first ``--num_inputs`` of the ``--probe_split`` split, as that run loaded it) for the dense network
(level 0) and every level, and computes every chosen similarity

* per layer, each level against the same layer of the dense network (``vs_dense``), and
* the full layer × layer matrix, each level's layers against the dense layers (``matrix``, one jitted
  ``similarity.pairwise`` call per metric over the stack of levels).

Token representations ``(n, tokens, d)`` (a transformer's layers) follow ``--tokens``: ``mean`` (default; the
means over tokens, ``(n, d)``, everywhere) or ``flatten`` (``vs_dense`` on the ``n·tokens`` tokens as samples,
``(n·tokens, d)``; the matrix, whose layers must share their samples, on ``(n, tokens·d)``).

Conv maps: the matrix always flattens them (``(n, h·w·c)``; layers of different spatial size stay comparable).
For ``vs_dense`` the CCA family uses ``--cca_conv``: ``pixel`` (default; every position of every input is a
sample, channels are features — svcca's and the pruned-layer-similarity study's choice) or ``flatten``. With
``flatten``, a layer with ``h·w·c ≥ n`` makes plain CCA degenerate (all correlations 1); SVCCA's SVD step helps.

Writes ``similarity.json`` (config, environment, levels, layers, results) and plots to ``--workdir`` (default
``<imp_workdir>/similarity``): ``vs_density_<metric>.png`` and ``matrix_<metric>_level<k>.png``. A level whose
representations hold NaN/Inf (a diverged run) is left out and listed, with the layers at fault, under
``skipped_levels``; the other levels are still compared (a non-finite dense network is an error).

An IMP run of several seeds (``--seeds=0:5`` there) is compared seed by seed, each level against the dense network
of its own seed, for the seeds ``--seeds`` picks (default: all of them). ``per_seed`` then holds each seed's
results as above; ``vs_dense`` and ``matrix`` are the means over the seeds, ``vs_dense_std`` the sample std
(``jaxprune.conventions.summary``), and the plots draw a ± one-std band.
"""
from __future__ import annotations

from pathlib import Path

from absl import app

from experiments import common
from experiments import imp as imp_exp  # noqa: F401 (read through experiments.similarity_run)
from experiments.similarity_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    CCA_FAMILY, DEFAULTS, METRICS, SPEC, STUDY_VARIANTS, SimilaritySettings, check_config, metrics_table, plot,
    representations, run)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_orbax()
    config = common.config_from_flags(SPEC)
    result = run(config)
    print(f"results: {Path(result['config']['workdir']) / 'similarity.json'}")
    std = result.get("vs_dense_std")
    width = 20 if std else 13
    if std:
        print(f"seeds {result['seeds']}: mean ± sample std over seeds")
    header = "layer".ljust(10) + "".join(m[:width - 1].rjust(width) for m in result["vs_dense"])
    for k, lv in enumerate(result["levels"]):
        print(f"level {lv['level']} density {lv['density']:.4f} test accuracy {lv['test_accuracy']:.4f}")
        print(header)
        for n in result["layers"]:
            cells = [f"{result['vs_dense'][m][n][k]:.4f}" + (f" ± {std[m][n][k]:.4f}" if std else "")
                     for m in result["vs_dense"]]
            print(n.ljust(10) + "".join(cell.rjust(width) for cell in cells))


if __name__ == "__main__":
    common.define_flags(SPEC)
    common.run_main(main)
