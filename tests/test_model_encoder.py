"""The encoder: shapes, masks, padding, the eval fast path against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from ultrafastbert.fff import FFF
from ultrafastbert.model import DenseFF, FFFSpec, ModelConfig, UltraFastBertModel
from ultrafastbert.model.encoder import sinusoid_table
from ultrafastbert.model.reference import compare_layerwise, reference_forward


def mini(ff=None, **changes) -> ModelConfig:
    base = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                       ff=ff or FFFSpec(2, 3))
    return base.replace(**changes) if changes else base


def build(config: ModelConfig, seed: int = 0) -> UltraFastBertModel:
    torch.manual_seed(seed)
    return UltraFastBertModel(config).eval()


def ids_and_mask(batch: int, seq: int, vocab: int, lengths=None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths or []):
        mask[row, length:] = 0
        ids[row, length:] = 0
    return ids, mask


def test_output_shape_and_dtype():
    model = build(mini())
    ids, mask = ids_and_mask(3, 11, 64)
    with torch.no_grad():
        out = model(ids, mask).last_hidden_state
    assert out.shape == (3, 11, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("ff", [FFFSpec(2, 3), DenseFF(24)])
def test_padding_does_not_change_real_positions(ff):
    model = build(mini(ff))
    ids, mask = ids_and_mask(2, 16, 64, lengths=[9, 16])
    with torch.no_grad():
        batched = model(ids, mask).last_hidden_state
        alone = model(ids[:1, :9]).last_hidden_state
        unmasked = model(ids).last_hidden_state  # negative control: padding attended to
    torch.testing.assert_close(batched[0, :9], alone[0], atol=2e-5, rtol=1e-5)
    assert (unmasked[0, :9] - alone[0]).abs().max() > 1e-3


def test_all_ones_mask_equals_no_mask():
    model = build(mini())
    ids, mask = ids_and_mask(2, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).last_hidden_state,
                                   model(ids).last_hidden_state)


@pytest.mark.parametrize("preset", ["tiny-fff", "tiny-dense"])
def test_eval_fast_path_equals_float64_reference(preset):
    model = build(ModelConfig.from_preset(preset))
    ids, mask = ids_and_mask(2, 24, 8192, lengths=[24, 13], seed=3)
    with torch.no_grad():
        fast = model(ids, mask).last_hidden_state
    ref, margin = reference_forward(model, ids, mask)
    real = mask.bool()
    # No path logit of a real token is near 0 for this seed, so fp32 routes must equal fp64 ones.
    assert margin[real].min() > 1e-5
    err = (fast.double() - ref)[real].abs().max()
    assert err < 5e-5, err
    assert compare_layerwise(model, ids, mask).ok(tolerance=1e-5)


def test_layerwise_check_can_fail():
    model = build(mini())
    ids, mask = ids_and_mask(2, 12, 64, lengths=[12, 7])
    assert compare_layerwise(model, ids, mask).ok(tolerance=1e-5)
    ffn = model.layers[1].ffn
    original = ffn.forward
    ffn.forward = lambda x: original(x) + 1e-3  # a kernel that is slightly wrong
    report = compare_layerwise(model, ids, mask)
    assert not report.ok(tolerance=1e-5) and report.max_abs_error > 5e-4


def test_explicit_kernel_choice_gives_the_same_result():
    model = build(mini())
    ids, mask = ids_and_mask(2, 12, 64, lengths=[12, 5])
    with torch.no_grad():
        auto = model(ids, mask).last_hidden_state
        model.set_fff_runtime("torch")
        assert all(m.kernel().name == "torch" for m in model.modules() if isinstance(m, FFF))
        torch.testing.assert_close(model(ids, mask).last_hidden_state, auto, atol=1e-5,
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="weight_format"):
        model.set_fff_runtime("torch", "int3")


def test_training_path_equals_inference_path_without_dropout():
    config = mini(embedding_dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0)
    model = build(config)
    ids, mask = ids_and_mask(2, 12, 64, lengths=[12, 8])
    with torch.no_grad():
        infer = model(ids, mask).last_hidden_state
    model.train()
    hidden = model(ids, mask).last_hidden_state  # sparse training FFF path, with autograd
    real = mask.bool()
    torch.testing.assert_close(hidden[real], infer[real], atol=1e-5, rtol=1e-5)
    hidden[real].pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.ffn.linear_in.weight"].abs().sum() > 0


def test_dropout_is_active_only_in_training():
    model = build(mini(hidden_dropout=0.5))
    ids, _ = ids_and_mask(1, 8, 64)
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)
        model.train()
        assert not torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


def test_initialisation_follows_the_released_recipe():
    model = build(ModelConfig.from_preset("tiny-fff"))
    emb = model.embedding
    assert torch.all(emb.word_embedding.weight[0] == 0)  # padding row
    assert math.isclose(emb.pos_embedding.scale_factor.item(), 256**-0.5, rel_tol=1e-6)
    w_in = model.layers[0].ffn.linear_in.weight
    assert abs(w_in.std().item() - 0.02) < 0.002
    assert torch.all(model.layers[0].ffn.linear_in.bias == 0)
    assert torch.all(model.layers[0].norm1.weight == 1)
    assert model.layers[0].attn.self_attention.query_key_value.bias is None
    assert model.layers[0].attn.dense.bias is None


def test_sinusoid_table_is_the_standard_one():
    table = sinusoid_table(50, 8)
    pos, i = 7, 2
    assert math.isclose(table[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 8)),
                        rel_tol=1e-5)
    assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 8)),
                        rel_tol=1e-5)
    assert sinusoid_table(4, 7).shape == (4, 7)  # odd widths work too


@pytest.mark.parametrize("make, error, words", [
    (lambda: (torch.tensor([[5, 64]]), None), ValueError, ["token id 64", "[0, 64)"]),
    (lambda: (torch.tensor([[5, -1]]), None), ValueError, ["token id -1"]),
    (lambda: (torch.ones(1, 17, dtype=torch.long), None), ValueError,
     ["sequence length 17", "max_seq_len=16", "truncate"]),
    (lambda: (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4)), ValueError,
     ["attention_mask shape (2, 4)", "input_ids shape (2, 5)"]),
    (lambda: (torch.ones(5, dtype=torch.long), None), ValueError, ["(batch, seq)", "unsqueeze"]),
    (lambda: (torch.ones(1, 5), None), TypeError, ["int64", "torch.float32"]),
])
def test_bad_inputs_give_clear_errors(make, error, words):
    model = build(mini())
    ids, mask = make()
    with pytest.raises(error) as err:
        model(ids, mask)
    for word in words:
        assert word in str(err.value)


def test_bf16_model_can_keep_its_fff_blocks_in_fp32():
    from ultrafastbert.fff import dispatch
    from ultrafastbert.model.pretrained import fff_compute_dtype

    model = build(ModelConfig.from_preset("tiny-fff"))
    ids, mask = ids_and_mask(2, 24, 8192, lengths=[24, 13], seed=3)
    with torch.no_grad():
        full = model(ids, mask).last_hidden_state
    model.set_precision(torch.bfloat16, fff_dtype=torch.float32)
    assert model.layers[0].ffn.linear_in.weight.dtype == torch.float32
    assert model.layers[0].attn.dense.weight.dtype == torch.bfloat16
    with torch.no_grad():
        low = model(ids, mask).last_hidden_state
    assert low.dtype == torch.bfloat16
    real = mask.bool()
    assert (low.float() - full)[real].abs().mean() < 0.05
    assert compare_layerwise(model, ids, mask, margin=1e-2).ok(tolerance=6e-2)
    fast_bf16 = dispatch.select("auto", "cpu", torch.bfloat16).name != "torch"
    fast_fp32 = dispatch.select("auto", "cpu", torch.float32).name != "torch"
    expected = torch.float32 if fast_fp32 and not fast_bf16 else torch.bfloat16
    assert fff_compute_dtype("cpu", torch.bfloat16) == expected
    assert fff_compute_dtype("cpu", torch.bfloat16, implementation="torch") == torch.bfloat16
    assert fff_compute_dtype("cpu", torch.float32) == torch.float32
