"""Products over the visited nodes only, as sparse CSR products (float32/float64 on CPU and
CUDA) or gathers (other dtypes and devices): the visited logits, and the output
``sum_p coeff_p * row[node_p]``. Shared by the inference path and the training path.
"""

from __future__ import annotations

import warnings

import torch

#: Bound on the elements of one gathered (tokens, trees, d) block (gather fallback only).
GATHER_ELEMENTS = 1 << 24
_CSR_DTYPES = (torch.float32, torch.float64)


def uses_csr(x: torch.Tensor) -> bool:
    """Whether the sparse (CSR) products serve this tensor's dtype."""
    return x.dtype in _CSR_DTYPES and x.device.type in ("cpu", "cuda")


def _csr(values: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """CSR ``(T, n_cols)`` with ``P`` entries per row: ``values``/``cols`` ``(T, P)``,
    columns increasing along each row."""
    tokens, per_row = cols.shape
    crow = torch.arange(0, tokens * per_row + 1, per_row, device=cols.device)
    return sparse_csr(crow, cols.reshape(-1), values.reshape(-1), (tokens, n_cols))


def sparse_csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without torch's "CSR support is in beta" warning (the paths
    that use it are tested here). Under ``torch.compile`` a warnings filter is a graph break, so
    there the warning is left to torch (it warns once per process)."""
    if torch.compiler.is_compiling():
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


def visited_logits(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
                   node: torch.Tensor) -> torch.Tensor:
    """Logits ``(T, K)`` of the nodes ``node`` ``(T, K)`` (ids increasing along each row)."""
    if uses_csr(x):  # index_select: much cheaper than advanced indexing for scalar gathers
        pattern = _csr(b_in.index_select(0, node.reshape(-1)), node, w_in.shape[0])
        return torch.sparse.sampled_addmm(pattern, x, w_in.t()).values().view(node.shape)
    return torch.bmm(w_in[node], x.unsqueeze(2)).squeeze(2) + b_in[node]


def combine(act: torch.Tensor, nodes: torch.Tensor, w_out_rows: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_p act[t, p] * w_out_rows[nodes[t, p]]``.

    Args:
        act: ``(T, P)`` coefficients; nodes: ``(T, P)`` ids increasing along each row;
        w_out_rows: ``(K*N, d)`` output rows (``linear_out.weight.T``), contiguous.
    Returns:
        ``(T, d)``.
    """
    if uses_csr(act):
        return _csr(act, nodes, w_out_rows.shape[0]) @ w_out_rows
    step = max(1, GATHER_ELEMENTS // (nodes.shape[1] * w_out_rows.shape[1]))
    return torch.cat([torch.bmm(a.unsqueeze(1), w_out_rows[n]).squeeze(1)
                      for a, n in zip(act.split(step), nodes.split(step), strict=True)])
