"""Soft-to-hard routing while distilling (``--routing-schedule soft-to-hard``): the soft
block against a float64 reference of its semantics (reach probabilities first, then values),
its hard limit, the schedule, and a run whose saved model is the plain hard-routed FFF."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from ultrafastbert.convert.pipeline import ConvertSettings  # noqa: E402
from ultrafastbert.convert.routing import RoutingSchedule, SoftToHard, phase_span  # noqa: E402
from ultrafastbert.errors import InputError  # noqa: E402
from ultrafastbert.model.converted import FFFBlock, fff_blocks  # noqa: E402
from ultrafastbert.model.ffn_structures import Extras, structured_reference  # noqa: E402
from ultrafastbert.model.soft_routing import (  # noqa: E402
    path_probabilities,
    set_soft_routing,
    soft_block_forward,
    soft_gates,
)
from ultrafastbert.train.recipe import WarmupCosineSchedule  # noqa: E402


def _block(extras=None, d=16, spec=(2, 3), seed=0) -> FFFBlock:
    torch.manual_seed(seed)
    block = FFFBlock(d, spec[0], spec[1], extras)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block.eval()


@torch.no_grad()
def _reference(block: FFFBlock, x: torch.Tensor, tau: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64, token by token, node by node: reach probabilities ``(T, K*N)`` and the soft
    output ``(T, d)`` (trees and block nodes' further neurons; no bias)."""
    fff = block.fff
    w = fff.linear_in.weight.double()
    b = fff.linear_in.bias.double()
    w_out = fff.linear_out.weight.double()
    xd = x.double()
    logits = xd @ w.T + b
    rms = logits.pow(2).mean(0).sqrt()
    n = 2 ** (fff.depth + 1) - 1
    probs = torch.zeros_like(logits)
    y = torch.zeros(x.shape[0], w_out.shape[0], dtype=torch.float64)
    neurons = block.node_neurons
    for t in range(x.shape[0]):
        for tree in range(fff.n_trees):
            reach = {0: 1.0}
            for local in range(n):
                g = tree * n + local
                p = reach[local]
                probs[t, g] = p
                gate = 1.0 / (1.0 + math.exp(-float(logits[t, g] / (tau * rms[g]))))
                if 2 * local + 2 < n:
                    reach[2 * local + 1], reach[2 * local + 2] = p * (1 - gate), p * gate
                y[t] += p * torch.nn.functional.gelu(logits[t, g]) * w_out[:, g]
                if neurons is not None:
                    for j in range(neurons.per_node):
                        r = g * neurons.per_node + j
                        a = xd[t] @ neurons.linear_in.weight[r].double() \
                            + neurons.linear_in.bias[r].double()
                        y[t] += p * torch.nn.functional.gelu(a) \
                            * neurons.linear_out.weight[:, r].double()
    return probs, y


@pytest.mark.parametrize("extras", [None, Extras(block=2)])
@pytest.mark.parametrize("tau", [0.3, 2.0])
def test_soft_block_against_its_float64_reference(extras, tau):
    """Reach probabilities first, then values; odd sizes."""
    block = _block(extras, d=37)
    x = torch.randn(13, 37)
    want_p, want_y = _reference(block, x, tau)
    fff = block.fff
    logits = torch.nn.functional.linear(x, fff.linear_in.weight, fff.linear_in.bias)
    probs = path_probabilities(soft_gates(logits, tau).view(13, 2, -1), fff.depth)
    assert torch.allclose(probs.reshape(13, -1).double(), want_p, atol=1e-6)
    # every level's reach probabilities sum to one per tree
    for level in range(fff.depth + 1):
        total = probs[..., 2**level - 1:2**(level + 1) - 1].sum(-1)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    with torch.no_grad():
        got = soft_block_forward(block, x, tau)
    assert torch.allclose(got.double(), want_y, atol=1e-4, rtol=1e-4)
    assert got.shape == x.shape


@pytest.mark.parametrize("extras", [None, Extras(block=2)])
def test_soft_routing_tends_to_the_hard_block(extras):
    """At a small temperature the soft block is the hard block (tokens whose path logits are
    far from 0 compared with the temperature); at a large one it is not (negative control)."""
    block = _block(extras)
    x = torch.randn(64, 16)
    nodes, want = structured_reference(block, x)
    fff = block.fff
    logits = torch.nn.functional.linear(x, fff.linear_in.weight, fff.linear_in.bias)
    rms = logits.pow(2).mean(0).sqrt()
    flat = nodes.reshape(64, -1)
    margin = (logits.gather(1, flat).abs() / rms[flat]).min(1).values
    clear = margin > 0.01  # e^(-0.01 / 1e-4): the soft gates are hard to float precision
    assert clear.sum() >= 48  # most tokens are far from a tie; the rest are excluded
    set_soft_routing([block], 1e-4)
    with torch.no_grad():
        got = block(x).double()
    assert torch.allclose(got[clear], want[clear], atol=1e-5)
    set_soft_routing([block], 1.0)
    with torch.no_grad():
        assert not torch.allclose(block(x).double(), want, atol=1e-2)
    set_soft_routing([block], None)  # back to the hard path: the reference exactly
    with torch.no_grad():
        assert torch.allclose(block(x).double(), want, atol=1e-5)
    assert block.soft_routing is None


def test_soft_routing_trains_the_routing_of_unvisited_nodes():
    """Hard routing gives no gradient to nodes off every path; soft routing gives one (the
    routing decision itself is trained)."""
    block = _block().train()
    x = torch.randn(5, 16)
    nodes, _ = structured_reference(block, x)
    unvisited = sorted(set(range(30)) - set(nodes.reshape(-1).tolist()))
    assert unvisited
    block(x).pow(2).sum().backward()
    hard = block.fff.linear_in.weight.grad[unvisited].abs().sum()
    block.zero_grad()
    set_soft_routing([block], 0.5)
    block(x).pow(2).sum().backward()
    soft = block.fff.linear_in.weight.grad[unvisited].abs().sum()
    assert hard == 0 and soft > 0
    with pytest.raises(InputError, match="temperature"):
        soft_gates(torch.zeros(2, 3), 0.0)


def test_schedule_anneals_to_hard():
    anneal = SoftToHard(0.5, 0.8)
    assert anneal.at(0.0) == 0.5 and anneal.at(0.4) == pytest.approx(0.25)
    assert anneal.at(0.8) == 0.0 and anneal.at(1.0) == 0.0
    blocks = [_block(), _block(Extras(block=2))]
    inner = WarmupCosineSchedule(warmup=0.05)
    start, span = phase_span("end-to-end", 0.4)
    assert (start, span) == (0.4, pytest.approx(0.6))
    schedule = RoutingSchedule(inner, blocks, anneal, start, span)
    assert schedule.lr_factor(0.0) == inner.lr_factor(0.0)
    assert all(b.soft_routing == pytest.approx(0.25) for b in blocks)
    schedule.lr_factor(0.7)  # overall 0.82: hard
    assert all(b.soft_routing is None for b in blocks)
    assert schedule.to_dict()["kind"] == "soft-to-hard routing"
    for bad in ({"soft_temperature": 0.0}, {"hard_from": 0.0}, {"hard_from": 1.5},
                {"routing_schedule": "soft"}):
        with pytest.raises(InputError):
            ConvertSettings(source="s", out="o", corpus="demo", **bad)


def test_run_soft_to_hard_saves_the_hard_model(bert_dir, tmp_path):
    """A run with the schedule: soft at first (its log says so), the saved model a plain
    hard-routed FFF (no soft state in the config, outputs are the hard reference's)."""
    import ultrafastbert
    from convertcheck import tiny_corpus
    from ultrafastbert.cli import main

    corpus = tiny_corpus(tmp_path / "c.txt", 300)
    out = tmp_path / "out"
    assert main(["convert", str(bert_dir), "--fff", "2x3b2", "--out", str(out),
                 "--budget", "60s", "--steps", "6", "--corpus", str(corpus),
                 "--init-tokens", "600", "--batch-size", "8", "--no-progress",
                 "--threads", "1", "--routing-schedule", "soft-to-hard",
                 "--soft-temperature", "0.4", "--hard-from", "0.7"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["settings"]["routing_schedule"] == "soft-to-hard"
    layerwise, e2e = report["phases"]["layerwise"], report["phases"]["end-to-end"]
    assert layerwise["routing"]["first_temperature"] == pytest.approx(0.4)
    assert e2e["routing"]["last_temperature"] == 0.0
    config = json.loads((out / "config.json").read_text())
    assert not any("soft" in key for key in config)
    model = ultrafastbert.from_pretrained(out)
    x = torch.randn(7, 32)
    for block in fff_blocks(model):
        assert block.soft_routing is None
        _, want = structured_reference(block, x)
        with torch.no_grad():
            assert torch.allclose(block(x).double(), want, atol=1e-5)
