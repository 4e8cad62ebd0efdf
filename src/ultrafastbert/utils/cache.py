"""One packed-weight cache for the layers that keep an inference copy of their parameters.

``FFF`` (the kernel's packed tree weights) and ``InferenceLinear`` (a oneDNN-prepacked weight)
both keep such a copy. It is valid while the layer still holds the same parameter tensors
(identity) at the same ``_version`` (in-place updates such as optimizer steps and
``load_state_dict``) and ``data_ptr`` (new storage), for the same ``extra`` key (an input dtype,
say). The owner clears it on ``train()``, ``.to()`` and runtime changes.

The copy is never saved, copied or pickled: ``torch.save``, ``pickle`` and ``copy.deepcopy`` of a
layer get an empty cache (the value may hold opaque kernel or oneDNN objects that cannot be
pickled), and the copy is rebuilt at the next inference call.
"""

from __future__ import annotations

from typing import Any

import torch


def fingerprint(params: tuple[torch.Tensor | None, ...], extra: Any = None) -> tuple:
    """The key :class:`PackedCache` compares: ``extra`` and, per tensor, its identity,
    ``_version`` and ``data_ptr`` (None for an absent tensor). Plain ints: comparing two keys
    never calls ``Tensor.__eq__``. (Hot paths may build the same tuple inline.)"""
    return (extra, *[None if p is None else (id(p), p._version, p.data_ptr()) for p in params])


class PackedCache:
    """A value (packed weights) built from some parameters, valid while they are unchanged.

    The owner builds a key of the parameters' identity, version and storage (see
    :func:`fingerprint`) and calls ``lookup(key)``: the stored value when the key is the one it
    was stored with, else None. ``store(params, key, value)`` keeps a new value; it also keeps
    ``params`` alive, so their ``id`` cannot be reused by other tensors while the key stands.
    """

    __slots__ = ("_params", "_key", "value")

    def __init__(self) -> None:
        self._params: tuple[torch.Tensor | None, ...] = ()
        self._key: tuple | None = None
        self.value: Any = None

    def clear(self) -> None:
        """Forget the value (the next lookup misses)."""
        self._params, self._key, self.value = (), None, None

    def lookup(self, key: tuple) -> Any:
        """The stored value if ``key`` equals the key it was stored with, else None."""
        return self.value if key == self._key else None

    def store(self, params: tuple[torch.Tensor | None, ...], key: tuple, value: Any) -> Any:
        """Keep ``value``, valid for ``key`` (built from ``params``); returns ``value``."""
        self._params, self._key, self.value = params, key, value
        return value

    def __reduce__(self) -> tuple:
        """Pickle and deepcopy give an empty cache (the value is process-local)."""
        return (PackedCache, ())

    def __repr__(self) -> str:
        return f"PackedCache({'empty' if self.value is None else 'filled'})"
