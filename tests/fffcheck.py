"""Shared checks for FFF implementations: routes first, then values (docs/design.md §2).

Hard routing means a tiny numeric difference near logit 0 sends a token down another path, so a
comparison excludes (and counts) rows whose reference path has a logit within ``margin`` of 0,
requires identical routes on every other row, and only then compares values on those rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ultrafastbert.fff import FFF, FFFTrace, fff_reference


@dataclass
class Comparison:
    """Outcome of comparing an implementation with the reference."""

    rows: int
    excluded: int
    route_mismatches: int
    max_abs_err: float


def reference_of(layer: FFF, x: torch.Tensor) -> FFFTrace:
    """The float64 reference trace of ``layer`` on ``x`` ``(T, d)``."""
    return fff_reference(x, layer.linear_in.weight, layer.linear_in.bias,
                         layer.linear_out.weight, layer.n_trees, layer.depth)


def compare(y: torch.Tensor, nodes: torch.Tensor, ref: FFFTrace, margin: float) -> Comparison:
    """Compare ``y`` ``(T, d)`` and ``nodes`` ``(T, K, D+1)`` with ``ref``; see module doc."""
    ambiguous = (ref.logits.abs() <= margin).flatten(1).any(1)
    same = (nodes.cpu() == ref.nodes.cpu()).flatten(1).all(1)
    mismatches = int((~same & ~ambiguous).sum())
    ok = same & ~ambiguous
    err = (y.cpu()[ok].double() - ref.y.cpu()[ok].double()).abs().max().item() if ok.any() else 0.0
    return Comparison(int(y.shape[0]), int(ambiguous.sum()), mismatches, err)


def assert_matches(y: torch.Tensor, nodes: torch.Tensor, ref: FFFTrace, *, margin: float = 0.0,
                   atol: float = 1e-5, max_excluded_frac: float = 0.02) -> Comparison:
    """Assert routes equal (outside the margin), then values within ``atol`` times the output
    scale (plus 1e-7 absolute); also that few rows were excluded."""
    c = compare(y, nodes, ref, margin)
    assert c.route_mismatches == 0, f"{c.route_mismatches} rows route differently: {c}"
    assert c.excluded <= max(1, max_excluded_frac * c.rows), f"too many rows excluded: {c}"
    scale = ref.y.abs().max().item()
    assert c.max_abs_err <= atol * scale + 1e-7, f"values differ: {c} (scale {scale})"
    return c


def make_layer(d_model: int, n_trees: int, depth: int, *, seed: int = 0, bias_std: float = 0.1,
               weight_std: float = 0.02, dtype: torch.dtype = torch.float32) -> FFF:
    """An eval-mode layer with non-zero biases (so bias handling is exercised)."""
    torch.manual_seed(seed)
    layer = FFF(d_model, n_trees=n_trees, depth=depth)
    with torch.no_grad():
        layer.linear_in.weight.normal_(0, weight_std)
        layer.linear_out.weight.normal_(0, weight_std)
        layer.linear_in.bias.normal_(0, bias_std)
    return layer.to(dtype).eval()


def inputs(tokens: int, d_model: int, *, seed: int = 1,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Distinct standard-normal rows ``(tokens, d_model)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, d_model, generator=gen).to(dtype)


def perturb_visited_row(layer: FFF, node: int, amount: float = 0.5) -> None:
    """Negative control helper: change the output row of one node in place."""
    with torch.no_grad():
        layer.linear_out.weight[:, node] += amount
