"""The lm_prune experiment as functions (``experiments.lm_prune`` is its command line): the typed config
:class:`LmPruneSettings` (the flags are derived from it), :func:`build` (corpus, GPT, training recipe),
:func:`dense_model` (train or reload the GPT by run identity), :func:`prune_one` and :func:`run` (every method and
pattern for every seed). Importable without side effects; ``experiments.lm_prune``'s docstring describes the workdir
and the flags.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common, settings
from experiments.settings import setting
from jaxprune import calibrated, checkpoint, conventions, data, lm, models, plots


@dataclasses.dataclass(frozen=True)
class LmPruneSettings:
    """Every flag of ``experiments.lm_prune``, in flag order (:func:`experiments.settings.spec`)."""

    dataset: str = setting("shakespeare", "text corpus", tuple(data.TEXTS))
    data_dir: str = setting("", "data directory (default: $JAXPRUNE_DATA_DIR, else ~/tensorflow_datasets)")
    width: int = setting(128, "GPT width d")
    depth: int = setting(4, "GPT blocks")
    heads: int = setting(4, "attention heads (a divisor of --width)")
    context: int = setting(128, "context length (characters)")
    tie_embeddings: bool = setting(False, "read out with the token embedding's transpose")
    steps: int = setting(1500, "AdamW training steps")
    batch_size: int = setting(32, "training windows per step")
    lr: float = setting(0.002, "peak learning rate (linear warmup, then cosine to 0)")
    warmup_steps: int = setting(100, "warmup steps")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay")
    train_seed: int = setting(0, "seed of the initialisation and the training windows")
    val_windows: int = setting(256, "fixed, evenly spaced validation windows the loss is averaged over")
    methods: tuple[str, ...] = setting(["magnitude", "wanda", "sparsegpt"],
                                       "pruning methods (jaxprune.calibrated registry)")
    patterns: tuple[str, ...] = setting(["50%", "2:4", "4:8"], "sparsity patterns: a percentage (unstructured) or "
                                                               "N:M (N kept of M)")
    calib_windows: int = setting(64, "calibration windows (random training windows of --context characters)")
    damp: float = setting(0.01, "SparseGPT damping: lambda times the mean of diag(H) is added to H's diagonal")
    blocksize: int = setting(128, "SparseGPT lazy-update and mask-selection block width (columns of inputs)")
    wanda_group: str = setting("output", "Wanda's comparison group at unstructured patterns: output (each output "
                                         "row, the paper's) or layer (the whole layer, as magnitude; results key "
                                         "wanda_layer)", calibrated.WANDA_GROUPS)
    seeds: tuple[str, ...] = setting(["0", "1", "2"], "calibration draws; results are their means (and stds)")
    sample_chars: int = setting(200, "characters generated per method and pattern for samples.txt (0: none)")
    workdir: str = setting("runs/lm_prune", "output directory (the trained GPT in dense/ is reused by run identity)")


SPEC = settings.spec(LmPruneSettings)
DEFAULTS = common.defaults(SPEC)
VAL_EVERY_CHUNKS = 4  # the training curve records the validation loss every 4 · log_every steps (and at the end)
MODEL_KEYS = ("width", "depth", "heads", "context", "tie_embeddings")
TRAIN_KEYS = ("dataset",) + MODEL_KEYS + ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "train_seed")


def build(c: dict) -> tuple[data.TextData, models.GPT, lm.LMConfig]:
    """The corpus, the model and the training recipe of config ``c`` (checked; errors name the flag)."""
    for k in ("width", "depth", "heads", "context", "steps", "batch_size", "val_windows", "calib_windows",
              "blocksize"):
        if isinstance(c[k], bool) or int(c[k]) < 1:
            raise ValueError(f"{k}={c[k]!r}: expected an integer >= 1")
    if c["width"] % c["heads"]:
        raise ValueError(f"heads={c['heads']}: expected a divisor of width={c['width']}")
    common.check_range("lr", c["lr"], 0, low_open=True)
    common.check_range("damp", c["damp"], 0)
    bad = [m for m in c["methods"] if m not in calibrated.METHODS]
    if bad or not c["methods"]:
        raise ValueError(f"methods={','.join(c['methods'])}: expected a non-empty subset of {tuple(calibrated.METHODS)}")
    for p in c["patterns"]:
        calibrated.parse_pattern(p)
    calibrated.Options(damp=c["damp"], blocksize=c["blocksize"], wanda_group=c["wanda_group"])  # checked now
    text = data.load_text(c["dataset"], c["data_dir"] or None)
    model = models.GPT(len(text.vocab), context=c["context"], width=c["width"], depth=c["depth"], heads=c["heads"],
                       tie_embeddings=c["tie_embeddings"])
    cfg = lm.LMConfig(steps=c["steps"], batch_size=c["batch_size"], context=c["context"], lr=c["lr"],
                      warmup_steps=c["warmup_steps"], weight_decay=c["weight_decay"], log_every=50)
    return text, model, cfg


def dense_model(c: dict, workdir: str | Path) -> tuple[dict, dict]:
    """The trained GPT's params and its record (``dense/trained.json``): reloaded when trained earlier with the same
    settings (:func:`experiments.common.check_stored`), else trained now (minutes to tens of minutes on a CPU)."""
    c = common.with_defaults(c, DEFAULTS)
    text, model, cfg = build(c)
    out = Path(workdir) / "dense"
    settings = common.settings_of(c, TRAIN_KEYS)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(c["train_seed"]))
    template = model.init(init_key, jnp.zeros((1, c["context"]), jnp.int32))["params"]
    if common.check_stored(out / "trained.json", settings, "the trained GPT"):
        rec = checkpoint.read_record(out / "trained.json", hint=f"; delete {out} to retrain")
        return checkpoint.restore(out / "checkpoint", template, rec["sha256"], hint=f"; delete {out} to retrain"), rec
    if out.exists():  # a partial run: start over
        shutil.rmtree(out)
    apply = lm.flax_apply(model)
    xv, yv = lm.fixed_windows(text.val, c["val_windows"], c["context"])
    curve = []

    def log(step: int, loss: float, seconds: float, params) -> None:
        point = {"step": step, "train_loss": loss, "seconds": seconds}
        if step % (VAL_EVERY_CHUNKS * cfg.log_every) == 0 or step == cfg.steps:
            point["val_loss"] = lm.evaluate(apply, params, xv, yv)
        curve.append(point)
        logging.info("step %d: %s", step, point)

    params, hist = lm.fit(apply, template, text.train, cfg, data_key, log)
    rec = {"settings": settings, "steps": cfg.steps, "seconds": hist["seconds"], "curve": curve,
           "val_loss": lm.evaluate(apply, params, xv, yv), "num_params": models.count_params(params),
           "val_windows": c["val_windows"]}
    out.mkdir(parents=True)
    rec["sha256"] = checkpoint.save(out / "checkpoint", params)
    checkpoint.write_record(out / "trained.json", rec)  # the finished marker (with its checksum), written last
    logging.info("trained in %.0f s: val loss %.4f nats/char", rec["seconds"], rec["val_loss"])
    return params, rec


def _calibration(text: data.TextData, c: dict, seed: int) -> np.ndarray:
    """``calib_windows`` random training windows ``(n, context)`` of calibration draw ``seed``."""
    x, _ = lm.random_windows(jnp.asarray(text.train), jax.random.PRNGKey(seed), c["calib_windows"], c["context"])
    return np.asarray(x)


class Trained(NamedTuple):
    """The trained GPT and what pruning runs need with it: its corpus and the fixed validation windows."""

    model: models.GPT
    params: dict
    text: data.TextData
    val: tuple  # (x, y): (val_windows, context) int32 each


def prune_one(c: dict, t: Trained, method: str, pattern: str, seed: int) -> dict:
    """Prune the trained params once (calibration draw ``seed``) and evaluate: ``{val_loss, density, seconds,
    layers, params}`` (density over the pruned kernels)."""
    apply, params, text, val = lm.flax_apply(t.model), t.params, t.text, t.val
    options = calibrated.Options(damp=c["damp"], blocksize=c["blocksize"], wanda_group=c["wanda_group"])
    t0 = time.perf_counter()
    pruned, keep, layers = calibrated.prune(apply, params, _calibration(text, c, seed), method, pattern, options)
    jax.block_until_ready(pruned)
    seconds = time.perf_counter() - t0
    kept = sum(r["density"] * np.prod(r["shape"]) for r in layers)
    total = sum(np.prod(r["shape"]) for r in layers)
    return {"val_loss": lm.evaluate(apply, pruned, *val), "density": float(kept / total), "seconds": seconds,
            "layers": layers, "params": pruned}


def run(config: LmPruneSettings | dict, workdir: str | Path) -> dict:
    """Train (or reuse) the GPT, prune it with every method and pattern for every seed (``config``: an
    :class:`LmPruneSettings` or its dict, missing keys the defaults); returns ``results.json``."""
    c = common.with_defaults(settings.as_config(config), DEFAULTS)
    text, model, _ = build(c)  # refused before anything is written
    seeds = common.seed_list(c["seeds"])
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    params, rec = dense_model(c, workdir)
    apply = lm.flax_apply(model)
    val = lm.fixed_windows(text.val, c["val_windows"], c["context"])
    dense = lm.evaluate(apply, params, *val)
    t = Trained(model, params, text, val)
    methods, details, samples = {}, {}, [f"dense: {_sample(c, t, params)!r}"]
    for method in c["methods"]:
        label = _label(method, c)
        methods[label] = {}
        for pattern in c["patterns"]:
            key = calibrated.parse_pattern(pattern).name
            # magnitude reads no calibration data: one prune serves every seed
            runs = [prune_one(c, t, method, pattern, s)
                    for s in (seeds[:1] if not calibrated.METHODS[method].calibrated else seeds)]
            methods[label][key], details.setdefault(label, {})[key] = _summarize(runs)
            samples.append(f"{label} {key}: {_sample(c, t, runs[0]['params'])!r}")
            logging.info("%s %s: %s (prune seconds %s)", label, key, methods[label][key],
                         details[label][key]["prune_seconds"])
    results = {"dense": {"val_loss": dense}, "methods": methods, "details": details,
               "training": {k: rec[k] for k in ("steps", "seconds", "num_params", "curve")},
               "config": {**c, "workdir": str(workdir)}, "environment": common.environment(), "seeds": list(seeds)}
    checkpoint.write_json(workdir / "results.json", results)
    (workdir / "samples.txt").write_text("\n".join(samples) + "\n")
    _plot(results, workdir / "val_loss.png")
    return results


def _label(method: str, c: dict) -> str:
    """The results key of ``method``: ``wanda_layer`` for Wanda compared over whole layers (never shown as ``wanda``)."""
    return "wanda_layer" if method == "wanda" and c["wanda_group"] == "layer" else method


def _summarize(runs: list[dict]) -> tuple[dict, dict]:
    """The results entry ``{val_loss, val_loss_std, density}`` (mean, sample std over the runs) and its details."""
    s = conventions.summary([r["val_loss"] for r in runs])
    entry = {"val_loss": s["mean"], "val_loss_std": s["std"], "density": runs[0]["density"]}
    details = {"n": s["n"], "per_seed": [r["val_loss"] for r in runs],
               "prune_seconds": [r["seconds"] for r in runs], "layers": runs[0]["layers"]}
    return entry, details


def _sample(c: dict, t: Trained, params) -> str:
    """``sample_chars`` characters generated by ``params`` after the first ``context // 2`` validation characters."""
    if not c["sample_chars"]:
        return ""
    out = lm.generate(t.model, params, t.text.val[:c["context"] // 2], jax.random.PRNGKey(0), c["sample_chars"], 0.8)
    return data.decode(out, t.text.vocab)


def _plot(results: dict, path: Path) -> None:
    methods = results["methods"]
    keys = list(next(iter(methods.values())))
    ys = {m: [methods[m][k]["val_loss"] for k in keys] for m in methods}
    ys["dense"] = [results["dense"]["val_loss"]] * len(keys)
    plots.curves(list(range(len(keys))), ys, path, xlabel="pattern: " + ", ".join(keys),
                 ylabel="validation loss (nats/char)", title="one-shot pruning of a character-level GPT",
                 errors={m: [methods[m][k]["val_loss_std"] for k in keys] for m in methods})


def report(results: dict, config: dict) -> str:
    """Markdown table: pattern × method, mean ± std validation loss (nats/char)."""
    methods = results["methods"]
    keys = list(next(iter(methods.values())))
    lines = [f"dense: {results['dense']['val_loss']:.4f} nats/char", "",
             "| pattern | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{methods[m][k]['val_loss']:.4f} ± {methods[m][k]['val_loss_std']:.4f}"
                                             for m in methods) + " |")
    return "\n".join(lines)
