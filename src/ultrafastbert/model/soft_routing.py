"""Soft routing of FFF trees while distilling, annealed to the hard routing the model runs with.

A hard FFF sends a token right at node ``n`` iff ``logit_n > 0``, so the routing rows get no
gradient from the choice itself (only through the visited nodes' activations). Soft routing
weights every node by the probability that a token reaches it, with gates
``g_n = sigmoid(logit_n / (tau * s_n))``:

- ``p_root = 1``, ``p_left(n) = p_n (1 - g_n)``, ``p_right(n) = p_n g_n`` (heap order: children
  of ``n`` are ``2n + 1`` and ``2n + 2``);
- ``y = sum over all nodes n of p_n GELU(logit_n) w_out[n]`` (block nodes: each of the node's
  neurons weighted by ``p_n``).

``s_n`` is node ``n``'s root-mean-square logit over the batch's tokens (detached), so ``tau``
is in units of each node's own logit scale. As ``tau -> 0`` every gate becomes the hard
decision and ``y`` the hard FFF's output (a logit of exactly 0 aside); at ``tau = 0`` (None)
the block runs its plain hard-routed path, so a converted model's semantics are those of
``../shared/DESIGN.md`` §1.1 whatever schedule trained it. Every node is computed (as in the
original "masked" training form), so a soft step costs about ``K 2^(D+1)`` neurons a token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError


def path_probabilities(gates: torch.Tensor, depth: int) -> torch.Tensor:
    """``(T, K, N)`` probability of reaching each node from gates ``(T, K, N)`` (the chance of
    going right at each node; heap order, ``N = 2**(depth+1) - 1``)."""
    probs = [torch.ones_like(gates[..., :1])]
    for level in range(depth):
        first = 2**level - 1
        g = gates[..., first:first + 2**level]
        p = probs[-1]
        probs.append(torch.stack([p * (1.0 - g), p * g], -1).reshape(*g.shape[:-1], -1))
    return torch.cat(probs, -1)


def soft_gates(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sigmoid(logit / (temperature * rms))`` ``(T, M)`` for ``logits`` ``(T, M)``, the RMS
    taken per node over the tokens (detached)."""
    if not temperature > 0:
        raise InputError(f"soft routing needs a temperature > 0, got {temperature}")
    scale = logits.detach().pow(2).mean(0).sqrt().clamp_min(1e-6)
    return torch.sigmoid(logits / (temperature * scale))


def soft_block_forward(block: Any, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """A converted block's trees (and block nodes' further neurons) soft-routed, ``x``
    ``(..., d)`` -> ``(..., d)`` without the block's bias and extras (see the module
    docstring). Differentiable in everything, routing rows included."""
    fff = block.fff
    flat = x.reshape(-1, x.shape[-1])
    logits = F.linear(flat, fff.linear_in.weight, fff.linear_in.bias)  # (T, K*N)
    gates = soft_gates(logits, temperature)
    probs = path_probabilities(gates.view(flat.shape[0], fff.n_trees, -1), fff.depth)
    probs = probs.reshape(flat.shape[0], -1)
    y = F.linear(F.gelu(logits) * probs, fff.linear_out.weight)
    neurons = getattr(block, "node_neurons", None)
    if neurons is not None:
        w_in = neurons.linear_in.weight
        inner = F.linear(flat.to(w_in.dtype), w_in, neurons.linear_in.bias)
        weights = probs.repeat_interleave(neurons.per_node, dim=1).to(w_in.dtype)
        y = y + F.linear(F.gelu(inner) * weights, neurons.linear_out.weight).to(y.dtype)
    return y.reshape(x.shape)


def set_soft_routing(blocks: list[Any], temperature: float | None) -> None:
    """Set every FFF block's soft-routing temperature (None or 0: hard routing)."""
    value = temperature if temperature else None
    for block in blocks:
        if hasattr(block, "soft_routing"):
            block.soft_routing = value
