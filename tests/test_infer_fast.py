"""The packed inference path (infer/packing.py, infer/fast.py) and precision per part
(infer/precision.py, infer/autoprecision.py) against the models' own padded float32 forward."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from convertcheck import tiny_bert
from ultrafastbert.errors import InputError
from ultrafastbert.fff import FFF
from ultrafastbert.fff.native.build import ISA_CODES, cpu_isa
from ultrafastbert.infer import Predictor, autoprecision, native_attention
from ultrafastbert.infer import packing as packing_module
from ultrafastbert.infer.fast import fast_encoder
from ultrafastbert.infer.packing import Packing
from ultrafastbert.infer.precision import ENV_FLAGS_OFF, unavailable
from ultrafastbert.model.converted import CONFIG_CLASSES, converted_class, family_of, token_types

LENGTHS = [1, 7, 13, 2, 5]  # odd lengths, a single token, the longest first-but-one


def _convert(source: Path, out: Path, family: str, task: str) -> Path:
    """A converted copy of the tiny source with random FFF blocks (2 trees of depth 2)."""
    import transformers as tf

    model = tf.AutoModel.from_pretrained(source) if task == "base" else \
        tf.AutoModelForSequenceClassification.from_pretrained(source)
    config = CONFIG_CLASSES[family](fff_layers=[[2, 2], [2, 2]], ffn_width=64,
                                    **model.config.to_diff_dict())
    config.model_type = f"ultrafastbert-{family}"
    converted = converted_class(family_of(family), task)(config)
    converted.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(3)
    for m in converted.modules():
        if isinstance(m, FFF):
            torch.nn.init.normal_(m.linear_in.weight, std=0.3)
            torch.nn.init.normal_(m.linear_out.weight, std=0.3)
            torch.nn.init.normal_(m.linear_in.bias, std=0.3)
    converted.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast")
    out = {"bert-dense": tiny_bert(root / "bert", seed=1),
           "roberta-dense": tiny_bert(root / "roberta", family="roberta", seed=2),
           "bert-clf-dense": tiny_bert(root / "bert-clf", task="sequence-classification",
                                       seed=4)}
    out["bert"] = _convert(out["bert-dense"], root / "bert-fff", "bert", "base")
    out["roberta"] = _convert(out["roberta-dense"], root / "roberta-fff", "roberta", "base")
    out["bert-clf"] = _convert(out["bert-clf-dense"], root / "bert-clf-fff", "bert",
                               "sequence-classification")
    return out


def _batch(vocab: int, lengths: list[int], pad: int = 0, sep: int = 3, cls: int = 2,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids/mask ``(N, S)``: [CLS] words [SEP] (a one-token text is [CLS] only)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids[:, 0] = cls
    for n, length in enumerate(lengths):
        if length > 1:
            ids[n, length - 1] = sep
    return ids.masked_fill(mask == 0, pad), mask


# ------------------------------------------------------------------------------ packing
def test_packing_round_trip_and_pooling():
    ids, mask = _batch(50, [3, 1, 4])
    packing = Packing.from_mask(mask)
    assert packing.n_tokens == 8 and packing.lengths.tolist() == [3, 1, 4]
    assert packing.position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    rows = packing.pack(ids)
    assert torch.equal(packing.unpack(rows), ids)
    x = torch.randn(8, 5)
    assert torch.allclose(packing.mean(x)[2], x[4:].mean(0))
    assert torch.equal(packing.first(x), x[[0, 3, 4]])
    with pytest.raises(InputError, match="right-padded"):
        Packing.from_mask(torch.tensor([[0, 1, 1]]))


def test_empty_rows_pool_to_zeros():
    packing = Packing.from_lengths([2, 0, 1])
    x = torch.ones(3, 4)
    assert packing.mean(x)[1].abs().sum() == 0 and packing.first(x)[1].abs().sum() == 0
    assert packing.mean(x)[0].tolist() == [1.0] * 4


# ------------------------------------------------------------------- packed vs padded (fp32)
def _fff_inputs(model: torch.nn.Module) -> tuple[list, list]:
    """Hooks recording the input of every FFF layer."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
               for m in model.modules() if isinstance(m, FFF)]
    return seen, handles


@pytest.fixture(params=["native", "math", "flash"])
def attention_kernel(request, monkeypatch):
    """Run a test with each attention kernel of :meth:`Packing.attention`."""
    if request.param == "native" and native_attention.unavailable_reason() is not None:
        assert cpu_isa() is None, native_attention.unavailable_reason()
        pytest.skip(f"native attention: {native_attention.unavailable_reason()}")
    monkeypatch.setattr(native_attention, "MAX_WIDTH",
                        10_000 if request.param == "native" else 0)
    monkeypatch.setattr(packing_module, "MATH_ATTENTION_MAX_WIDTH",
                        10_000 if request.param == "math" else 0)
    return request.param


def _attention_per_text(qkv: torch.Tensor, lengths: list[int], n_heads: int) -> torch.Tensor:
    """Float64 reference: softmax attention of each text alone, ``(T, 3d)`` -> ``(T, d)``."""
    d = qkv.shape[1] // 3
    out, start = [], 0
    for length in lengths:
        q, k, v = qkv[start:start + length].double().view(length, 3, n_heads, d // n_heads).unbind(1)
        probs = torch.einsum("shd,thd->hst", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        out.append(torch.einsum("hst,thd->shd", probs, v).reshape(length, d))
        start += length
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_equals_per_text_softmax(attention_kernel, dtype):
    lengths = [5, 0, 1, 9, 2]  # an empty text, a one-token text, odd lengths
    packing = Packing.from_lengths(lengths)
    qkv = torch.randn(packing.n_tokens, 3 * 24, generator=torch.Generator().manual_seed(1))
    got = packing.attention(qkv.to(dtype), n_heads=3)  # bfloat16: always the flash kernel
    assert got.shape == (sum(lengths), 24) and got.dtype == dtype
    want = _attention_per_text(qkv.to(dtype).float(), lengths, 3).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # negative control: attention over the whole batch (no per-text mask) is not this
    whole = _attention_per_text(qkv, [packing.n_tokens], 3).float()
    assert not torch.allclose(whole, want, atol=1e-2)


def _native_case(head_dim: int, seed: int) -> tuple[list[int], Packing, torch.Tensor]:
    """Texts of lengths 0..70 (several key chunks and query blocks with tails) and random q/k/v
    ``(T, 3 * 3 * head_dim)`` for 3 heads; skips only where no native library can run."""
    if native_attention.unavailable_reason() is not None:
        assert cpu_isa() is None, native_attention.unavailable_reason()
        pytest.skip(f"native attention: {native_attention.unavailable_reason()}")
    lengths = [70, 1, 0, 17, 33, 4, 16, 9]
    packing = Packing.from_lengths(lengths)
    qkv = torch.randn(packing.n_tokens, 9 * head_dim,
                      generator=torch.Generator().manual_seed(seed))
    return lengths, packing, qkv


NATIVE_ISAS = [isa for isa in ("avx512", "avx2")
               if cpu_isa() is not None and ISA_CODES[isa] <= ISA_CODES[cpu_isa() or "avx2"]]


@pytest.mark.parametrize("isa", NATIVE_ISAS)
@pytest.mark.parametrize("layout", ["blocks", "heads"])
@pytest.mark.parametrize("head_dim", [32, 20])
def test_native_attention_on_long_and_ragged_texts(isa, layout, head_dim):
    """Several key chunks and query blocks with tails (lengths 1..70), both row layouts, a head
    width that is not a multiple of either vector width, each instruction set this CPU runs;
    against the float64 per-text softmax."""
    lengths, packing, qkv = _native_case(head_dim, seed=2)
    n_heads, d = 3, 3 * head_dim
    qkv[5:9] *= 6.0  # large scores (exp far below 1): the max subtraction and exp's range matter
    got = native_attention.packed_attention(qkv, packing.starts, packing.lengths, n_heads, layout,
                                            isa)
    blocks = qkv if layout == "blocks" else (  # [head][q, k, v] -> [q | k | v]
        qkv.view(-1, n_heads, 3, head_dim).transpose(1, 2).reshape(-1, 3 * d))
    want = _attention_per_text(blocks, lengths, n_heads).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # negative control: the other layout's reading of the same rows is not this
    other = "heads" if layout == "blocks" else "blocks"
    assert not torch.allclose(native_attention.packed_attention(
        qkv, packing.starts, packing.lengths, n_heads, other, isa), want, atol=1e-2)


@pytest.mark.parametrize("head_dim", [32, 20, 7])
def test_native_bf16_attention(head_dim):
    """bfloat16 q/k/v: the AVX512-BF16 op (even head widths) or the widened float32 one (odd),
    against the float64 per-text softmax of the same bf16 values; the automatic choice of
    instruction set follows the head width."""
    lengths, packing, qkv = _native_case(head_dim, seed=3)
    n_heads, qkv = 3, qkv.bfloat16()
    want = _attention_per_text(qkv.float(), lengths, n_heads).float()
    got = native_attention.packed_attention(qkv, packing.starts, packing.lengths, n_heads)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs()
    assert float(err.max()) < 2e-2 and float(err.mean()) < 2e-3, (err.max(), err.mean())
    if head_dim % 2 == 0 and native_attention._STATE.get("bf16"):
        widened = native_attention.packed_attention(qkv, packing.starts, packing.lengths,
                                                    n_heads, "blocks", "avx512")
        assert not torch.equal(got, widened)  # the bf16 op ran: its rounding differs
        with pytest.raises(RuntimeError, match="even head width"):
            native_attention.packed_attention(qkv[:, :3 * 3 * 5].contiguous(), packing.starts,
                                              packing.lengths, 3, "blocks", "avx512bf16")


def test_native_attention_switch_and_bad_input(monkeypatch):
    monkeypatch.setenv(native_attention.ENV_SWITCH, "0")
    assert "ULTRAFASTBERT_NATIVE_ATTENTION=0" in native_attention.unavailable_reason()
    assert not native_attention.usable(torch.zeros(2, 9))
    monkeypatch.delenv(native_attention.ENV_SWITCH)
    if native_attention.unavailable_reason() is not None:
        assert cpu_isa() is None, native_attention.unavailable_reason()
        pytest.skip(f"native attention: {native_attention.unavailable_reason()}")
    with pytest.raises(RuntimeError, match="outside the 4 rows"):
        native_attention.packed_attention(torch.zeros(4, 9), torch.tensor([0, 2]),
                                          torch.tensor([2, 3]), 1)


@pytest.mark.parametrize("name", ["bert", "roberta", "bert-dense"])
def test_packed_transformers_model_equals_padded(dirs, name, attention_kernel):
    predictor = Predictor.from_pretrained(dirs[name], precision="float32")
    model, view = predictor.model, predictor.view
    ids, mask = _batch(60, LENGTHS, pad=predictor.pad_id)
    packing = Packing.from_mask(mask)
    seen, handles = _fff_inputs(model)
    with torch.inference_mode():
        reference = view.hidden(ids, mask)
        padded_inputs = [packing.pack(x) for x in seen]
        seen.clear()
        encoder = predictor.fast_encoder_for(len(LENGTHS), packing.n_tokens)
        hidden = encoder.hidden(packing.pack(ids), packing)
    for h in handles:
        h.remove()
    fffs = [m for m in model.modules() if isinstance(m, FFF)]
    assert len(seen) == len(fffs) == (0 if "dense" in name else 2)
    for fff, a, b in zip(fffs, padded_inputs, seen, strict=True):  # routes first, then values
        with torch.inference_mode():
            assert torch.equal(fff.forward_with_nodes(a)[1], fff.forward_with_nodes(b)[1])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, packing.pack(reference), atol=1e-5, rtol=1e-5)
    # negative control: the same rows without the attention mask differ
    with torch.inference_mode():
        unmasked = view.hidden(ids, torch.ones_like(mask))
    assert not torch.allclose(packing.pack(unmasked), hidden, atol=1e-3)


def test_token_types_follow_the_first_separator(dirs):
    predictor = Predictor.from_pretrained(dirs["bert"], precision="float32")
    from ultrafastbert.infer.fast import packed_token_types

    ids, mask = _batch(60, [6, 4, 1], pad=predictor.pad_id)
    ids[0, 2] = 3  # a pair: [CLS] a [SEP] b c [SEP]
    packing = Packing.from_mask(mask)
    expect = packing.pack(token_types(ids, 3))
    assert expect.sum() == 3
    assert torch.equal(packed_token_types(packing.pack(ids), packing, 3), expect)


@pytest.mark.parametrize("ff", ["fff", "dense"])
def test_packed_native_encoder_equals_padded(ff, attention_kernel):
    import modelcheck
    from ultrafastbert.model import UltraFastBertModel
    from ultrafastbert.model.config import DenseFF

    changes = {"vocab_size": 64} if ff == "fff" else {"vocab_size": 64, "ff": DenseFF(48)}
    model = UltraFastBertModel(modelcheck.mini(**changes)).eval()
    ids, mask = _batch(64, LENGTHS)
    packing = Packing.from_mask(mask)
    encoder = fast_encoder(model, "float32")
    with torch.inference_mode():
        reference = model(ids, mask).last_hidden_state
        hidden = encoder.hidden(packing.pack(ids), packing)
    torch.testing.assert_close(hidden, packing.pack(reference), atol=1e-5, rtol=1e-5)


TEXTS = ["the king saw the queen", "", "dog", "a man and a woman walk by the river.",
         "the old city", "fire"]


@pytest.mark.parametrize("name", ["bert", "bert-dense"])
def test_predictor_embed_packed_equals_padded(dirs, name):
    predictor = Predictor.from_pretrained(dirs[name], precision="float32", batch_size=4)
    packed = predictor.embed(TEXTS)
    ids, mask = predictor.encode(TEXTS)
    with torch.inference_mode():
        padded = predictor.view.pooled(ids, mask, "mean")
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predictor.embed_ids(ids, mask), padded, atol=1e-5, rtol=1e-5)
    one = predictor.embed(TEXTS[0])  # a batch of one
    torch.testing.assert_close(one, padded[0], atol=1e-5, rtol=1e-5)
    first = predictor.embed(TEXTS, pooling="first")
    torch.testing.assert_close(first, predictor.view.pooled(ids, mask, "first"), atol=1e-5,
                               rtol=1e-5)


def test_predictor_classify_packed_equals_padded(dirs):
    predictor = Predictor.from_pretrained(dirs["bert-clf"], precision="float32")
    ids, mask = predictor.encode(TEXTS)
    with torch.inference_mode():
        reference = predictor.view.class_logits(ids, mask).softmax(-1)
    results = predictor.classify_ids(ids, mask)
    got = torch.tensor([list(r.probabilities.values()) for r in results])
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ precisions
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_each_precision_stays_close_to_float32(dirs, precision):
    if unavailable(precision) is not None:
        pytest.skip(f"{precision}: {unavailable(precision)}")
    texts = TEXTS * 4
    reference = Predictor.from_pretrained(dirs["bert"], precision="float32").embed(texts)
    other = Predictor.from_pretrained(dirs["bert"], precision=precision).embed(texts)
    cosine = torch.nn.functional.cosine_similarity(other, reference)
    assert float(cosine.mean()) >= 0.99
    assert not torch.equal(other, reference)  # it did run another precision
    unrelated = Predictor.from_pretrained(dirs["roberta"], precision="float32").embed(texts)
    assert float(torch.nn.functional.cosine_similarity(unrelated, reference).mean()) < 0.9


def test_cpu_without_the_flags_falls_back_with_a_clear_message(dirs, monkeypatch):
    monkeypatch.setenv(ENV_FLAGS_OFF, "avx512_vnni,avx_vnni,amx_int8,avx512_bf16,amx_bf16")
    why = unavailable("int8")
    assert why is not None and "vnni" in why and ENV_FLAGS_OFF in why
    with pytest.raises(InputError, match="precision int8 cannot run here"):
        Predictor.from_pretrained(dirs["bert"], precision="int8")
    ok, refused = autoprecision.candidates("cpu")
    assert ok == ["float32"] and set(refused) == {"bfloat16", "int8"}


# ------------------------------------------------------------------------------ auto
class FakeClock:
    """Time advances only when a candidate runs: ``cost[precision]`` ms per call."""

    def __init__(self, cost: dict[str, float]):
        self.now, self.cost = 0.0, cost

    def __call__(self) -> float:
        return self.now

    def run(self, precision: str) -> None:
        self.now += self.cost[precision] / 1e3


def _measure(dirs, cost, texts=TEXTS):
    predictor = Predictor.from_pretrained(dirs["bert"], precision="float32")
    clock = FakeClock(cost)

    def pooled(precision, ids, packing):
        clock.run(precision)
        return predictor._pooled_at(precision, ids, packing)

    return autoprecision.measure(list(cost), predictor._encode_packed, pooled, clock=clock,
                                 texts=texts * 6, max_length=predictor.max_length)


def test_auto_picks_the_fastest_passing_precision(dirs):
    choice = _measure(dirs, {"float32": 10.0, "bfloat16": 6.0, "int8": 4.0})
    assert choice.chosen == {"short": "int8", "long": "int8"}
    assert "fastest passing" in choice.reasons["short"]
    slow = _measure(dirs, {"float32": 3.0, "bfloat16": 6.0, "int8": 4.0})
    assert slow.chosen["short"] == "float32"


def test_auto_refuses_a_precision_that_fails_the_accuracy_rule(dirs, monkeypatch):
    monkeypatch.setattr(autoprecision, "MIN_COSINE", 1.01)  # nothing but float32 passes
    choice = _measure(dirs, {"float32": 10.0, "int8": 4.0})
    assert choice.chosen["short"] == "float32"
    assert "refused: int8 cosine" in choice.reasons["short"]


def test_auto_is_cached_per_cpu(dirs, monkeypatch, tmp_path):
    from ultrafastbert.fff.native import tuning

    monkeypatch.setenv(tuning.ENV_SWITCH, "1")
    monkeypatch.setattr(tuning, "cache_path", lambda: tmp_path / "knobs.json")
    monkeypatch.setattr(tuning, "_MEMO", {})
    calls = []
    real = autoprecision.measure

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, texts=TEXTS * 6, repeats=1, **kwargs)

    monkeypatch.setattr(autoprecision, "measure", counted)
    first = Predictor.from_pretrained(dirs["bert"])  # precision auto (the default)
    assert first.precision == "auto" and len(calls) == 1
    monkeypatch.setattr(tuning, "_MEMO", {})
    second = Predictor.from_pretrained(dirs["bert"])
    assert len(calls) == 1  # read from the file
    assert second.precision_choice.chosen == first.precision_choice.chosen
    assert autoprecision.cached_entries()


def test_auto_with_tuning_off_is_float32(dirs):
    predictor = Predictor.from_pretrained(dirs["bert"])  # the suite runs with autotuning off
    assert predictor.precision_choice.chosen == {"short": "float32", "long": "float32"}
    assert "nothing measured" in predictor.precision_choice.reasons["short"]


def test_kernels_cli_shows_the_precision_choice(dirs, capsys):
    from ultrafastbert.cli import main

    assert main(["kernels", "--model", str(dirs["bert"])]) == 0
    out = capsys.readouterr().out
    assert "encoder precisions" in out and "int8" in out
    assert "short: float32 -- autotuning is off" in out
    assert "packed attention (Predictor / serve): " in out
    assert ("native up to" in out) == (native_attention.unavailable_reason() is None)


def test_kernels_cli_says_why_the_native_attention_is_off(monkeypatch, capsys):
    from ultrafastbert.cli import main

    monkeypatch.setenv(native_attention.ENV_SWITCH, "0")
    assert main(["kernels"]) == 0
    assert "packed attention (Predictor / serve): PyTorch (native: disabled by the environment " \
        "(ULTRAFASTBERT_NATIVE_ATTENTION=0)" in capsys.readouterr().out


def test_predict_cli_takes_a_precision(dirs, capsys):
    from ultrafastbert.cli import main

    assert main(["predict", "embed", str(dirs["bert"]), "a dog", "--precision", "float32",
                 "--json"]) == 0
    with pytest.raises(SystemExit):
        main(["predict", "embed", str(dirs["bert"]), "a dog", "--precision", "int4"])
