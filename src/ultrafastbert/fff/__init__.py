"""Fast feedforward (FFF) layers: tree maths, the reference, kernels, training, the module."""

from .dispatch import describe, explain, select
from .layer import FFF, FFFRuntime
from .reference import FFFTrace, fff_reference
from .training import fff_masked, fff_sparse, route

__all__ = ["FFF", "FFFRuntime", "FFFTrace", "describe", "explain", "fff_masked", "fff_reference",
           "fff_sparse", "route", "select"]
