"""experiments.filter_prune --prune_heads on a tiny pre-LN vision transformer written here (not models.ViT): heads
removed per round with closed-form counts, the kept heads are the criterion's, resume restores the shrunk model
exactly, --prune_heads off leaves the heads (and an old workdir is reused), and a model without attention is
refused naming the flag."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, filter_prune
from jaxprune import checkpoint, criteria, models, structured, train
from jaxprune import runs as jaxprune_runs


class Glimpse(nn.Module):
    """(n, 8, 8, 1) → 4×4 patches (4 tokens of 16) → dense ``dim`` + a summary token + learned positions →
    one pre-LN block (``heads`` heads of 2 via ``MultiHeadDotProductAttention``; dense ``ffn`` → GELU →
    dense) → LN → the summary token → dense ``num_classes``."""

    num_classes: int = 10
    heads: int = 3
    ffn: int = 6
    dim: int = 8

    @nn.compact
    def __call__(self, x):
        n = x.shape[0]
        x = x.reshape(n, 2, 4, 2, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(n, 4, 16)
        x = nn.Dense(self.dim, name="patchify")(x)
        summary = self.param("summary", nn.initializers.normal(0.02), (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(summary, (n, 1, self.dim)), x], axis=1)
        x = x + self.param("place", nn.initializers.normal(0.02), (5, self.dim))
        y = nn.LayerNorm(name="pre_mix")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=2 * self.heads, name="mix")(y, y)
        y = nn.LayerNorm(name="pre_ffn")(x)
        x = x + nn.Dense(self.dim, name="ffn_b")(nn.gelu(nn.Dense(self.ffn, name="ffn_a")(y)))
        return nn.Dense(self.num_classes, name="readout")(nn.LayerNorm(name="post")(x)[:, 0])


QKV = ("mix/query", "mix/key", "mix/value")
BASE = dict(dataset="digits", model="test_filter_prune_heads:Glimpse", model_kwargs="", normalize="none",
            optimizer="adam", lr=0.003, weight_decay=0.0, schedule="constant", milestones=[], training_steps="4",
            batch_size=64, max_test_examples=200, finetune_steps="2", finetune_lr=0.001, layer_kind="dense",
            prune_heads=True, prune_fraction=0.25, max_pruned_fraction=0.8, max_rounds=2)


def _counts(h: int, f: int) -> tuple[int, int]:
    """(MACs, parameters) of Glimpse with ``h`` heads and ``f`` hidden units: 5 tokens of width 8, heads of 2."""
    t, d, k, c = 5, 8, 2, 10
    macs = 4 * 16 * d + 3 * t * d * h * k + 2 * h * t * t * k + t * h * k * d + 2 * t * d * f + d * c
    params = (16 * d + d) + d + t * d + 3 * 2 * d + 3 * (d * h * k + h * k) + (h * k * d + d)
    return macs, params + (d * f + f) + (f * d + d) + (d * c + c)


def _spy_removals(monkeypatch) -> list:
    removed, real = [], structured.remove_many

    def remove_many(model, variables, keep, **kw):
        removed.append({k: np.asarray(v) for k, v in keep.items()})
        return real(model, variables, keep, **kw)

    monkeypatch.setattr(structured, "remove_many", remove_many)
    return removed


def _trained(tmp_path, cfg):
    """The model, the saved round-0 variables and the training data of a finished run in ``tmp_path``."""
    c = filter_prune._config(cfg)
    tr, _ = common.load_data(c["dataset"], c["data_dir"], c["normalize"])
    model = common.build_model(c, tr.num_classes)
    x, y = jnp.asarray(tr.images), jnp.asarray(tr.labels)
    template = models.init(model, jax.random.PRNGKey(0), x.shape)
    return model, checkpoint.restore(tmp_path / "seed_0" / "trained" / "checkpoint", template), x, y


@pytest.mark.slow  # ~35 s alone (training + 2 rounds + a rerun; compilation dominates)
def test_heads_and_units_are_removed_per_round_with_closed_form_counts(tmp_path, monkeypatch):
    removed = _spy_removals(monkeypatch)
    cfg = {**BASE, "criterion": "l1", "model_kwargs": '{"heads": 2}'}
    res = filter_prune.run(cfg, tmp_path)
    rounds = res["rounds"]
    assert res["head_groups"] == [list(QKV)] and res["layers"] == ["ffn_a"] and res["original_heads"] == {QKV[0]: 2}
    # 2 heads → 2 − ceil(0.5) = 1, then at the floor max(1, ceil(0.2 · 2)) = 1 (a one-head attention is not scored
    # again) while the 6 units go on: → 6 − ceil(1.5) = 4 → 4 − 1 = 3
    assert [(r["heads"], r["widths"]) for r in rounds] == [({QKV[0]: h}, {"ffn_a": f}) for h, f in
                                                           [(2, 6), (1, 4), (1, 3)]]
    for r, (h, f) in zip(rounds, [(2, 6), (1, 4), (1, 3)]):
        assert (r["flops"], r["params"]) == (2 * _counts(h, f)[0], _counts(h, f)[1])
    assert rounds[2]["pruned_head_fraction"] == pytest.approx(1 / 2)
    table = filter_prune.format_table(res)
    assert "| heads left | units left |" in table and "| 2 | 1 | 3 |" in table
    # Round 1 kept, per head, the largest l1 norm of its query/key/value weights and biases together.
    model, v, x, _ = _trained(tmp_path, cfg)
    p = v["params"]["mix"]
    l1 = sum(np.abs(np.asarray(p[n]["kernel"], np.float64)).sum((0, 2)) + np.abs(np.asarray(p[n]["bias"])).sum(1)
             for n in ("query", "key", "value"))
    want = np.sort(np.argsort(-l1, kind="stable")[:1])
    assert len(removed) == 2 and set(removed[1]) == {"ffn_a"}
    assert all(removed[0][n].tolist() == want.tolist() for n in QKV)
    f = v["params"]["ffn_a"]
    l1_units = np.abs(np.asarray(f["kernel"], np.float64)).sum(0) + np.abs(np.asarray(f["bias"], np.float64))
    assert removed[0]["ffn_a"].tolist() == np.sort(np.argsort(-l1_units, kind="stable")[:4]).tolist()

    # Resume: a rerun retrains nothing and reports the same rounds; round 2's checkpoint restores into a model with
    # one head and 3 units whose test accuracy is the recorded one.
    monkeypatch.undo()
    runs, real_run = [], train.run
    monkeypatch.setattr(train, "run", lambda *a, **k: (runs.append(1), real_run(*a, **k))[1])
    assert filter_prune.run(cfg, tmp_path)["rounds"] == rounds and not runs
    small, sv, rec = jaxprune_runs.load_round(tmp_path / "seed_0", 2, model, x.shape)
    assert all(rec[k] == rounds[2][k] for k in ("round", "widths", "heads", "params", "accuracy_after_finetune"))
    assert (small.heads, small.ffn) == (1, 3) and sv["params"]["mix"]["out"]["kernel"].shape == (1, 2, 8)
    _, te = common.load_data("digits", "", "none", max_test=200)
    assert common.accuracy(small, sv, jnp.asarray(te.images), jnp.asarray(te.labels)) == rec["accuracy_after_finetune"]


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_taylor_keeps_the_heads_of_largest_summed_query_key_value_scores():
    model = Glimpse()
    x = jax.random.uniform(jax.random.PRNGKey(3), (12, 8, 8, 1))
    y = jnp.arange(12) % 10
    v = model.init(jax.random.PRNGKey(4), x)
    c = filter_prune._config({**BASE, "criterion": "taylor"})
    keep = filter_prune._keep(c, model, v, {"ffn_a": 3, QKV[0]: 1}, (x, y), None)
    s = criteria.scores("taylor", model, v, x, y, normalized=False)
    per_head = sum(np.asarray(s[n], np.float64) for n in QKV)
    assert per_head.shape == (3,) and len(set(per_head.tolist())) == 3
    assert all(keep[n].tolist() == [int(np.argmax(per_head))] for n in QKV)
    assert keep["ffn_a"].tolist() == np.sort(np.argsort(-np.asarray(s["ffn_a"]))[:3]).tolist()


@pytest.mark.slow
def test_prune_heads_off_keeps_the_heads_and_an_earlier_workdir_is_reused(tmp_path, monkeypatch):
    cfg = {**BASE, "prune_heads": False, "max_rounds": 1}
    res = filter_prune.run(cfg, tmp_path)
    assert "head_groups" not in res and all("heads" not in r for r in res["rounds"])
    assert [r["widths"] for r in res["rounds"]] == [{"ffn_a": 6}, {"ffn_a": 4}]
    assert res["rounds"][1]["params"] == _counts(3, 4)[1]  # all three heads are still there
    # A workdir written before --prune_heads existed (config.json without it) is the same run: reused as is.
    stored = checkpoint.read_json(tmp_path / "config.json")
    checkpoint.write_record(tmp_path / "config.json", {k: v for k, v in stored.items()
                                                       if k not in ("prune_heads", checkpoint.RECORD_SHA)})
    runs = []
    monkeypatch.setattr(train, "run", lambda *a, **k: runs.append(1))
    cfg.pop("prune_heads")
    assert filter_prune.run(cfg, tmp_path)["rounds"] == res["rounds"] and not runs
    with pytest.raises(ValueError, match=r"prune_heads: False -> True"):
        filter_prune.run({**cfg, "prune_heads": True}, tmp_path)


def test_prune_heads_on_a_model_without_attention_is_refused_naming_the_flag(tmp_path):
    cfg = {**BASE, "model": "vgg", "vgg_cfg": ["6", "M", "10"], "layer_kind": "conv"}
    with pytest.raises(ValueError, match=r"prune_heads=True: VGG has no attention heads .*--prune_heads=false"):
        filter_prune.run(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="prune_heads='yes': expected true or false"):
        filter_prune.run({**BASE, "prune_heads": "yes"}, tmp_path / "w")


def test_plot_criteria_draws_runs_of_equal_flops_and_refuses_others(tmp_path):
    def res(acc: float, flops=(4e6, 3e6)) -> dict:
        return {"rounds": [{"flops": f, "accuracy_before_finetune": acc, "accuracy_after_finetune": acc,
                            "accuracy_after_finetune_std": 0.01} for f in flops]}

    filter_prune.plot_criteria({"l1": res(0.9), "taylor": res(0.95)}, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0
    with pytest.raises(ValueError, match="different FLOPs"):
        filter_prune.plot_criteria({"l1": res(0.9), "taylor": res(0.9, (4e6, 2e6))}, tmp_path / "b.png")
