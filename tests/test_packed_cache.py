"""The one packed-weight cache (utils.cache.PackedCache), and the layers that use it: a model
that ran inference can still be saved, pickled and deep-copied (the copy is an empty cache)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from modelcheck import mini
from ultrafastbert.fff import FFF
from ultrafastbert.model import UltraFastBertForMaskedLM
from ultrafastbert.model.linear import InferenceLinear
from ultrafastbert.utils.cache import PackedCache, fingerprint


def test_hit_only_for_the_same_unchanged_tensors():
    w, b = torch.randn(4, 3), torch.randn(4)
    cache = PackedCache()

    def lookup(*params, extra=torch.float32):
        return cache.lookup(fingerprint(params, extra))

    assert lookup(w, b) is None
    cache.store((w, b), fingerprint((w, b), torch.float32), "packed")
    assert lookup(w, b) == "packed"
    assert lookup(w, b, extra=torch.bfloat16) is None   # another extra key
    assert lookup(w.clone(), b) is None                 # another tensor, same values
    assert lookup(w, None) is None
    assert lookup(w) is None
    w.add_(1.0)                                         # in place: _version moves
    assert lookup(w, b) is None
    cache.store((w, b), fingerprint((w, b), torch.float32), "again")
    w.data = torch.randn(4, 3)                          # new storage, same object
    assert lookup(w, b) is None
    cache.store((w, b), fingerprint((w, b), torch.float32), "third")
    assert lookup(w, b) == "third"
    cache.clear()
    assert lookup(w, b) is None


def test_the_fff_hot_path_key_is_the_fingerprint():
    layer = FFF(8, n_trees=2, depth=2)
    assert layer._key(torch.float32) == fingerprint(layer._params(), torch.float32)
    no_bias = FFF(8, n_trees=1, depth=2, bias=False)
    assert no_bias._key(torch.float64) == fingerprint(no_bias._params(), torch.float64)


def test_copies_and_pickles_are_empty():
    w = torch.randn(2, 2)
    cache = PackedCache()
    cache.store((w,), fingerprint((w,)), lambda: None)  # a value pickle cannot handle
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache)), copy.copy(cache)):
        assert isinstance(twin, PackedCache) and twin.value is None
        assert twin.lookup(fingerprint((w,))) is None


def _filled_caches(model: torch.nn.Module) -> int:
    caches = [m._cache for m in model.modules() if isinstance(m, FFF)]
    caches += [m._cache for m in model.modules() if isinstance(m, InferenceLinear)]
    return sum(c.value is not None for c in caches)


@pytest.mark.parametrize("saver", ["torch.save", "pickle", "deepcopy"])
def test_model_after_inference_can_be_saved_pickled_and_copied(saver):
    torch.manual_seed(0)
    model = UltraFastBertForMaskedLM(mini()).eval()
    ids = torch.randint(7, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    assert _filled_caches(model) > 0  # the caches hold kernel / oneDNN objects now
    if saver == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    elif saver == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        twin = copy.deepcopy(model)
    assert _filled_caches(twin) == 0
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert _filled_caches(twin) > 0  # rebuilt on use


def test_layers_rebuild_after_changes():
    torch.manual_seed(0)
    layer = FFF(16, n_trees=1, depth=3).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        y0 = layer(x)
        assert layer._cache.value is not None
        layer.linear_out.weight.mul_(2.0)            # in place: the next call repacks
        torch.testing.assert_close(layer(x), 2 * y0)
        layer.train()
        assert layer._cache.value is None
    lin = InferenceLinear(8, 4).eval()
    xs = torch.randn(3, 8)
    with torch.no_grad():
        lin(xs)
        lin.weight.zero_()
        torch.testing.assert_close(lin(xs), lin.bias.expand(3, 4))


def test_hot_path_benchmark_script_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fff_hot_path.py"
    spec = importlib.util.spec_from_file_location("fff_hot_path", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "hot.json"
    threads = torch.get_num_threads()
    try:
        status = script.main(["--before", "HEAD", "--rounds", "1", "--calls", "3",
                              "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    result = json.loads(out.read_text())
    assert result["fff_1x11_1_token"]["after_us"] > 0
    assert result["inference_linear_768x2304_1_token"]["before_us"] > 0
    assert "avx512_bf16" in result["settings"]["environment"]["cpu_flags"]
