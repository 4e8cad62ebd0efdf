"""Make ``transformers``' ``Auto*`` classes know our models, without importing ``transformers``.

``install_transformers_hook()`` registers at once when ``transformers.models.auto`` is already
imported; otherwise it waits, with a one-shot import hook, until the program first touches an
``Auto*`` class (which imports that package) and registers right after it loads. Programs that
never use ``transformers`` pay nothing; importing ``transformers`` itself stays as cheap as it
was. A failure to register is logged, never raised into the user's import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

#: Imported by ``transformers`` the first time any ``Auto*`` class is used.
TRIGGER = "transformers.models.auto"


def _register() -> None:
    try:
        from .hf import register_with_transformers

        register_with_transformers()
        logger.debug("registered ultrafastbert with transformers' Auto classes")
    except Exception as err:  # never break the user's import of transformers
        logger.warning("could not register ultrafastbert with transformers: %s", err)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """One-shot finder: lets the normal finders load ``TRIGGER``, then registers."""

    def find_spec(self, fullname: str, path, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install_transformers_hook() -> None:
    """Register with ``transformers`` now if its ``Auto*`` package is loaded, else on first use.

    Idempotent. ``ultrafastbert.model.hf.register_with_transformers()`` does the same eagerly.
    """
    if TRIGGER in sys.modules:
        _register()
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
