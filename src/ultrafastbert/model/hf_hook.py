"""Make ``transformers``' ``Auto*`` classes know our models, without importing ``transformers``.

``install_transformers_hook()`` registers at once when ``transformers.models.auto`` is already
imported; otherwise it waits, with an import hook, until the program loads that package (the
first use of any ``Auto*`` class or ``pipeline`` does) and registers once the outermost import
that loaded it has finished: registering in the middle of it would import
``transformers.modeling_utils`` while ``transformers`` is half-initialised (``from transformers
import pipeline`` as the first transformers import failed that way). A registration that fails
is retried after the next ``transformers`` import, and logged. Programs that never use
``transformers`` pay nothing; importing ``transformers`` itself stays as cheap as it was.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

logger = logging.getLogger(__name__)

#: Imported by ``transformers`` the first time any ``Auto*`` class is used.
TRIGGER = "transformers.models.auto"
#: Modules whose imports the hook follows (registration waits until none is in progress).
WATCHED = ("transformers", "ultrafastbert.model.hf")


def _register() -> bool:
    """Register now; False (logged) when it failed."""
    try:
        from .hf import register_with_transformers

        register_with_transformers()
    except Exception as err:  # never break the user's import of transformers
        logger.warning("could not register ultrafastbert with transformers (will retry after "
                       "the next transformers import, or call ultrafastbert.model.hf."
                       "register_with_transformers()): %s", err)
        return False
    logger.debug("registered ultrafastbert with transformers' Auto classes")
    return True


def _watched(name: str) -> bool:
    return any(name == w or name.startswith(w + ".") for w in WATCHED)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Follows the imports of :data:`WATCHED` modules; once :data:`TRIGGER` is loaded, registers
    when no watched import is in progress any more, then removes itself."""

    def __init__(self) -> None:
        self.depth = 0  # watched modules executing right now (nested imports)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not _watched(fullname):
            return None
        spec = _spec_from_other_finders(self, fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_maybe_register(module: ModuleType) -> None:
            self.depth += 1
            try:
                exec_module(module)
            finally:
                self.depth -= 1
            if self.depth == 0 and TRIGGER in sys.modules and _register():
                _uninstall(self)

        loader.exec_module = exec_then_maybe_register  # type: ignore[method-assign]
        return spec


def _spec_from_other_finders(hook: _RegisterAfterImport, fullname: str,
                             path: Sequence[str] | None, target: ModuleType | None
                             ) -> importlib.machinery.ModuleSpec | None:
    for finder in sys.meta_path:
        if finder is hook or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _uninstall(hook: _RegisterAfterImport) -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


def install_transformers_hook() -> None:
    """Register with ``transformers`` now if its ``Auto*`` package is loaded, else once it is.

    Idempotent. ``ultrafastbert.model.hf.register_with_transformers()`` does the same eagerly.
    """
    if TRIGGER in sys.modules and not _importing() and _register():
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _importing() -> bool:
    """Whether a watched module is still being initialised (registering now would fail)."""
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False)
               for name, m in list(sys.modules.items()) if _watched(name))
