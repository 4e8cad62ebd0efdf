"""Per-layer budgets from the measured error (``--fff auto:...``): parsing, the oracle error
curve against a brute-force float64 one, the greedy split, and a run that records its choice."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from ultrafastbert.convert.budget import (  # noqa: E402
    AutoBudget,
    allocate,
    oracle_curve,
    parse_auto,
    plan,
)
from ultrafastbert.errors import InputError  # noqa: E402
from ultrafastbert.model.converted import DenseFFN  # noqa: E402


def test_parse_auto():
    assert parse_auto("auto:64", 1536, 6) == AutoBudget(64.0, 7)
    assert parse_auto("auto:4.2%", 1536, 6).budget == pytest.approx(64.512)
    assert parse_auto("AUTO: 48 @5", 1536, 6) == AutoBudget(48.0, 5)
    assert AutoBudget(64.0, 7).total_trees(6) == 48
    assert AutoBudget(64.512, 7).total_trees(6) == 48  # whole trees, never over the budget
    for bad, message in (("auto:", "auto:N"), ("auto:x", "auto:N"), ("auto:4@25", "<= 20"),
                         ("auto:4", "fewer than one tree")):
        with pytest.raises(InputError, match=message):
            parse_auto(bad, 1536, 6)


def test_allocate_follows_the_largest_gain():
    # layer 0 falls fast, layer 1 is flat, layer 2 in between
    curves = [[0.9, 0.5, 0.3, 0.25, 0.24], [0.5, 0.49, 0.48, 0.47, 0.46],
              [0.8, 0.6, 0.45, 0.4, 0.38]]
    trees = allocate(curves, 7)
    assert sum(trees) == 7 and min(trees) >= 1
    assert trees == [3, 1, 3]  # gains: 0.4 (l0), 0.2 (l0), 0.2 (l2), 0.15 (l2); flat l1 keeps 1
    assert allocate(curves, 3) == [1, 1, 1]
    with pytest.raises(InputError, match="cannot give"):
        allocate(curves, 2)


def _brute_force(x, dense, norm, k):
    """Float64, token by token: the ``k`` largest ``|GELU(a_j)| |w2_j|`` kept."""
    xd = x.double()
    w1, b1, w2, b2 = (t.double() for t in (dense.w1, dense.b1, dense.w2, dense.b2))
    a = torch.nn.functional.gelu(xd @ w1.T + b1)
    full = norm(xd + a @ w2.T + b2)
    num = den = 0.0
    for t in range(len(xd)):
        keep = (a[t].abs() * w2.norm(dim=0)).topk(k).indices
        y = a[t, keep] @ w2[:, keep].T + b2
        num += float((norm(xd[t] + y) - full[t]).pow(2).sum())
        den += float((norm(xd[t]) - full[t]).pow(2).sum())
    return num / den


def test_oracle_curve_against_brute_force():
    torch.manual_seed(0)
    d, w = 12, 40
    dense = DenseFFN(torch.randn(w, d) * 0.5, torch.randn(w) * 0.1, torch.randn(d, w) * 0.5,
                     torch.randn(d) * 0.1)

    def norm(v):
        return torch.nn.functional.layer_norm(v, (d,))

    x = torch.randn(30, d)
    ks = [4, 8, 20, 40]
    got = oracle_curve(x, dense, norm, ks)
    want = [_brute_force(x, dense, norm, k) for k in ks]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got[-1] == pytest.approx(0.0, abs=1e-6)  # every neuron: the dense block
    assert got[0] > got[1] > got[2] > 0  # negative control: few neurons lose something


def test_plan_spends_the_budget(source):
    from ultrafastbert.convert.objectives import frozen_norm
    from ultrafastbert.model.converted import FAMILIES, dense_ffns, post_norms

    dense = dense_ffns(source.model, FAMILIES["bert"])
    torch.manual_seed(0)
    xs = [torch.randn(200, 32) for _ in dense]
    norms = [frozen_norm(n) for n in post_norms(source.model)]
    record = plan(AutoBudget(12.0, 2), xs, dense, norms, 64)
    assert record["total_trees"] == 8 and sum(record["trees"]) == 8
    assert record["fff_layers"] == [[t, 2] for t in record["trees"]]
    assert len(record["oracle_post_norm_error"]) == 2


def test_run_with_auto_budget(bert_dir, tmp_path):
    """``--fff auto:12@2`` on the tiny model (2 layers, FFN width 64): 8 trees of depth 2 split
    by the measured error, recorded in conversion.json; the saved model has the chosen layout
    and costs the budget."""
    import ultrafastbert
    from convertcheck import tiny_corpus
    from ultrafastbert.cli import main
    from ultrafastbert.model.converted import fff_blocks

    corpus = tiny_corpus(tmp_path / "c.txt", 300)
    out = tmp_path / "out"
    assert main(["convert", str(bert_dir), "--fff", "auto:12@2", "--out", str(out),
                 "--budget", "60s", "--steps", "3", "--corpus", str(corpus),
                 "--init-tokens", "600", "--batch-size", "8", "--no-progress",
                 "--threads", "1"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    allocation = report["fff_allocation"]
    assert report["settings"]["fff"] == "auto:12@2"
    assert sum(allocation["trees"]) == 8 and report["fff_layers"] == allocation["fff_layers"]
    assert report["active_fraction"] == pytest.approx(8 * 3 / (2 * 64))
    model = ultrafastbert.from_pretrained(out)
    assert [[b.fff.n_trees, b.fff.depth] for b in fff_blocks(model)] == allocation["fff_layers"]
