"""A converted sentence-transformers model stays a sentence-transformers directory.

``ultrafastbert convert`` writes the converted ``transformers`` model at the root of its output
folder. When the source was a sentence-transformers folder (``modules.json``), the output also
gets the source's module list (its Transformer entry pointed at the root, where the converted
model is), the folders of its other modules (``1_Pooling/config.json``, ``2_Normalize``) and its
``sentence_bert_config.json`` / ``config_sentence_transformers.json``. Then
``SentenceTransformer(out)`` (after ``import ultrafastbert``, which registers the converted
classes with ``transformers``' ``Auto*`` factories) runs the same pipeline as the source:
transformer, the source's pooling, normalisation, giving the vectors ``Predictor.embed`` gives.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..model.layouts import read_json_object

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
#: Root files of a sentence-transformers folder that travel with the modules (when present).
SETTINGS_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")
#: Module types the project's own embedding (``Predictor.embed``) reproduces.
REPRODUCED = ("Transformer", "Pooling", "Normalize")


def write_sentence_transformers_files(source_root: str | Path, out: str | Path) -> bool:
    """Copy the sentence-transformers layout of ``source_root`` into ``out`` (the converted model
    already at ``out``'s root). Returns False, writing nothing, when the source has no
    ``modules.json`` (a plain ``transformers`` folder)."""
    source_root, out = Path(source_root), Path(out)
    modules_file = source_root / MODULES_FILE
    if not modules_file.is_file():
        return False
    modules: Any = json.loads(modules_file.read_text(encoding="utf-8"))
    if not isinstance(modules, list):
        raise ValueError(f"{modules_file} is not a list of modules")
    rewritten = [_module_entry(dict(m), source_root, out) for m in modules]
    for name in SETTINGS_FILES:
        if (source_root / name).is_file():
            shutil.copyfile(source_root / name, out / name)
    (out / MODULES_FILE).write_text(json.dumps(rewritten, indent=2) + "\n", encoding="utf-8")
    log.info("sentence-transformers modules of %s written to %s", source_root, out)
    return True


def _module_entry(module: dict[str, Any], source_root: Path, out: Path) -> dict[str, Any]:
    """One ``modules.json`` entry for ``out``: the Transformer at the root (the converted model),
    any other module's folder copied as the source has it."""
    kind = str(module.get("type", "")).rsplit(".", 1)[-1]
    if kind == "Transformer":
        return {**module, "path": ""}
    if kind not in REPRODUCED:
        log.warning("%s: module %s is copied, but Predictor.embed does not apply it (only %s)",
                    source_root, kind, ", ".join(REPRODUCED))
    path = str(module.get("path", ""))
    folder = source_root / path
    if path and folder.is_dir():
        shutil.copytree(folder, out / path)
    elif path:
        (out / path).mkdir(parents=True, exist_ok=True)  # e.g. Normalize: no files of its own
    if kind == "Pooling":
        read_json_object(out / path / "config.json", "the sentence-transformers Pooling config")
    return module
