"""Fast feedforward (FFF) layers: tree maths, the reference, kernels, training, the module.

One subpackage per back end, each with the same parts where it has them: ``kernel`` (the
registered kernel class), ``routing`` (the tree walk), ``training`` (the differentiable path):
``pytorch/``, ``triton/``, ``native/`` (C++), ``gemm/`` (depth 0). ``kernel.py`` is the
interface they implement, ``dispatch`` picks one (``token_split`` when the choice depends on
the call size), ``layer`` is the module.
"""

from .dispatch import describe, explain, select
from .layer import FFF, FFFRuntime
from .pytorch.routing import route
from .pytorch.training import fff_masked, fff_sparse
from .reference import FFFTrace, fff_reference

__all__ = ["FFF", "FFFRuntime", "FFFTrace", "describe", "explain", "fff_masked", "fff_reference",
           "fff_sparse", "route", "select"]
