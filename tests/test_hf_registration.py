"""The lazy ``transformers`` registration works whatever the program imports first (issue 13,
item 1): each order runs in a fresh process, as a user's script would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import FIXTURES, subprocess_env

pytest.importorskip("transformers")

ORDERS = {
    "ultrafastbert, then pipeline": "import ultrafastbert\nfrom transformers import pipeline",
    "pipeline, then ultrafastbert": "from transformers import pipeline\nimport ultrafastbert",
    "ultrafastbert.model.hf first": "import ultrafastbert.model.hf\n"
                                    "from transformers import pipeline",
    "ultrafastbert, then AutoModel": "import ultrafastbert\n"
                                     "from transformers import AutoModelForMaskedLM, pipeline",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ultrafastbert.model import ModelConfig, UltraFastBertForMaskedLM

    config = ModelConfig.from_dict(json.loads((FIXTURES / "train_model.json").read_text()))
    out = tmp_path_factory.mktemp("hf") / "M"
    UltraFastBertForMaskedLM(config).save_pretrained(
        out, tokenizer_file=FIXTURES / "train_tokenizer.json")
    return out


@pytest.mark.parametrize("imports", ORDERS.values(), ids=list(ORDERS))
def test_pipeline_recognises_the_model(imports: str, model_dir: Path) -> None:
    script = (f"{imports}\nfrom transformers import AutoConfig\n"
              f"fill = pipeline('fill-mask', model={str(model_dir)!r})\n"
              "print('TOKEN', fill('the <mask> is here')[0]['token_str'])\n"
              f"print('TYPE', type(AutoConfig.from_pretrained({str(model_dir)!r})).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not register" not in proc.stderr
    assert "TOKEN " in proc.stdout and "TYPE UltraFastBertConfig" in proc.stdout


def test_a_failed_registration_is_retried(monkeypatch) -> None:
    """The hook stays installed after a failure and registers at the next transformers import."""
    from ultrafastbert.model import hf_hook

    hook = hf_hook._RegisterAfterImport()
    results = iter([False, True])
    monkeypatch.setattr(hf_hook, "_register", lambda: next(results))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    monkeypatch.setitem(sys.modules, hf_hook.TRIGGER, sys.modules.get(hf_hook.TRIGGER)
                        or object())
    for name in ("transformers.ufb_test_a", "transformers.ufb_test_b"):
        fake = type("Loader", (), {"exec_module": lambda self, module: None})()
        spec = type("Spec", (), {"loader": fake})()
        monkeypatch.setattr(hf_hook, "_spec_from_other_finders", lambda *a, s=spec: s)
        hook.find_spec(name, None).loader.exec_module(None)
        if name.endswith("_a"):
            assert hook in sys.meta_path  # failed: still waiting
    assert hook not in sys.meta_path  # registered on the retry, then removed
