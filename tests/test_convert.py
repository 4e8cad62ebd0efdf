"""Conversion of tiny random BERT-family models into FFF (built here, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from convertcheck import tiny_bert, tiny_corpus  # noqa: E402
from ultrafastbert.convert.data import cut_batch, ffn_io, load_segments  # noqa: E402
from ultrafastbert.convert.init import init_block, relative_error  # noqa: E402
from ultrafastbert.convert.source import (  # noqa: E402
    active_fraction,
    load_source,
    make_student,
    parse_fff,
)
from ultrafastbert.errors import ConfigError, DataError, InputError  # noqa: E402
from ultrafastbert.model.converted import (  # noqa: E402
    FAMILIES,
    FFFBlock,
    RemovedFFN,
    dense_ffns,
    fff_blocks,
    load_converted,
)


def _ids(n: int = 3, s: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    return ids, mask


# ------------------------------------------------------------------------------ parsing
def test_parse_fff_one_for_all_and_per_layer():
    assert parse_fff("8x7", 3) == [[8, 7]] * 3
    assert parse_fff("1x2, 4X3,none", 3) == [[1, 2], [4, 3], None]


@pytest.mark.parametrize("spec, message", [("8x7,8x7", "lists 2 configurations"),
                                           ("8by7", "is not KxD"), ("0x3", "K >= 1")])
def test_parse_fff_bad(spec, message):
    with pytest.raises(InputError, match=message):
        parse_fff(spec, 3)


def test_active_fraction():
    assert active_fraction([[8, 7]] * 2, 1536) == pytest.approx(64 / 1536)
    assert active_fraction([[8, 7], None], 1536) == pytest.approx(32 / 1536)


# ------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("task", ["base", "masked-lm"])
def test_student_replaces_every_ffn_and_copies_the_rest(tmp_path, family, task):
    src = load_source(tiny_bert(tmp_path / "m", family=family, task=task))
    student = make_student(src, parse_fff("2x3", src.n_layers))
    blocks = fff_blocks(student)
    assert len(blocks) == 2 and all(isinstance(b, FFFBlock) for b in blocks)
    src_state = src.model.state_dict()
    st_state = student.state_dict()
    ffn = ("intermediate.", "output.dense.", ".ffn.")
    kept = [k for k in src_state if not any(f in k for f in ffn)]
    assert kept and all(torch.equal(src_state[k], st_state[k]) for k in kept)
    assert not any(("intermediate.dense" in k or "ffn.lin1" in k) for k in st_state)
    # the block's output bias is the dense block's
    dense = dense_ffns(src.model, FAMILIES[family])
    assert torch.equal(blocks[0].bias, dense[0].b2)


def test_outputs_differ_from_source_before_init(source):
    """Negative control for the copy test: the FFN really is replaced."""
    student = make_student(source, parse_fff("2x3", source.n_layers))
    ids, mask = _ids()
    with torch.no_grad():
        a = source.model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = student(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() > 1e-2


def test_sentence_transformers_settings(source):
    assert (source.pooling, source.normalize, source.max_seq_len) == ("mean", True, 48)


# ------------------------------------------------------------------------------ init
def _layer_inputs(source, tmp_path, n_lines=200):
    rows = load_segments(str(tiny_corpus(tmp_path / "c.txt", n_lines)), source.tokenizer_dir,
                         max_len=32)
    return ffn_io(source.model, cut_batch(torch.from_numpy(rows), 0))


@pytest.mark.parametrize("split", ["median", "neuron"])
def test_init_beats_random_on_held_out_inputs(source, tmp_path, split):
    xs, ys = _layer_inputs(source, tmp_path)
    half = xs.shape[1] // 2
    dense = dense_ffns(source.model, FAMILIES["bert"])
    student = make_student(source, parse_fff("4x3", source.n_layers))
    block = fff_blocks(student)[0]
    with torch.no_grad():
        random_error = relative_error(block(xs[0, half:]), ys[0, half:])
    report = init_block(block, dense[0], xs[0, :half], split=split)
    with torch.no_grad():
        init_error = relative_error(block(xs[0, half:]), ys[0, half:])
    assert report.refit <= report.greedy + 1e-6
    assert init_error < 0.7 * random_error, (init_error, random_error)


def test_init_uses_dense_rows(source, tmp_path):
    xs, _ = _layer_inputs(source, tmp_path, 60)
    dense = dense_ffns(source.model, FAMILIES["bert"])
    block = fff_blocks(make_student(source, parse_fff("1x2", source.n_layers)))[0]
    init_block(block, dense[0], xs[0], split="neuron")
    w = block.fff.linear_in.weight
    assert all(any(torch.equal(row, d) for d in dense[0].w1) for row in w)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_post_norm_view_is_the_layer_output(tmp_path, family):
    """LayerNorm_l(x_l + y_l) is layer l's output (the post-norm loss compares the right thing);
    the block's own output is not (negative control)."""
    from ultrafastbert.convert.objectives import LayerwiseObjective
    from ultrafastbert.model.converted import post_norms

    src = load_source(tiny_bert(tmp_path / family, family=family))
    ids, mask = _ids()
    xs, ys = ffn_io(src.model, cut_batch(ids * mask, 0))
    hidden = src.model(input_ids=ids * mask, attention_mask=mask,
                       output_hidden_states=True).hidden_states
    real = mask.bool()
    blocks = fff_blocks(make_student(src, parse_fff("2x2", src.n_layers)))
    post = LayerwiseObjective(blocks, torch.ones(len(blocks)), norms=post_norms(src.model))
    plain = LayerwiseObjective(blocks, torch.ones(len(blocks)))
    for i in range(src.n_layers):
        layer_out = hidden[i + 1][real]
        torch.testing.assert_close(post.view(i, xs[i], ys[i]), layer_out, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain.view(i, xs[i], ys[i]), layer_out, atol=1e-2)


def test_post_norm_loss_is_zero_for_the_dense_output_and_positive_otherwise(source):
    from ultrafastbert.convert.objectives import LayerwiseObjective
    from ultrafastbert.model.converted import post_norms

    ids, mask = _ids()
    xs, ys = ffn_io(source.model, cut_batch(ids * mask, 0))
    blocks = fff_blocks(make_student(source, parse_fff("2x2", source.n_layers)))
    objective = LayerwiseObjective(blocks, torch.ones(len(blocks)),
                                   norms=post_norms(source.model))
    assert float(objective(xs, ys).loss) > 0.0
    dense = dense_ffns(source.model, FAMILIES["bert"])

    class Dense(torch.nn.Module):
        def __init__(self, ffn):
            super().__init__()
            self.ffn = ffn

        def forward(self, x):
            return self.ffn(x)

    exact = LayerwiseObjective([Dense(d) for d in dense], torch.ones(len(dense)),
                               norms=post_norms(source.model))
    exact.trained = list(range(len(dense)))
    assert float(exact(xs, ys).loss) < 1e-10


def _init_settings(source, tmp_path, **kw):
    from ultrafastbert.convert.pipeline import ConvertSettings

    return ConvertSettings(source=source.path, out=tmp_path / "o", fff="2x3",
                           corpus="unused", init_tokens=600, batch_size=8, **kw)


def _initialised(source, tmp_path, rows, inputs):
    from ultrafastbert.convert.pipeline import initialise

    student = make_student(source, parse_fff("2x3", source.n_layers))
    initialise(student, source, rows, _init_settings(source, tmp_path, init_inputs=inputs), 0,
               tmp_path / inputs, setup_s=0.0)
    return student


def test_student_input_init_restores_the_teachers_residual_sum(source, tmp_path):
    """``init_inputs="student"``: layer 0 sees the teacher's inputs (same fit up to rounding);
    later blocks, fitted on the student's own inputs, bring the residual sum closer to the
    teacher's than blocks fitted on the teacher's inputs (the negative control)."""
    from ultrafastbert.convert.data import block_inputs

    rows = load_segments(str(tiny_corpus(tmp_path / "c.txt", 300)), source.tokenizer_dir,
                         max_len=32)
    by_teacher = _initialised(source, tmp_path, rows, "teacher")
    by_student = _initialised(source, tmp_path, rows, "student")
    w = [fff_blocks(m)[0].fff.linear_in.weight for m in (by_teacher, by_student)]
    torch.testing.assert_close(w[0], w[1])
    text = cut_batch(torch.from_numpy(rows[-80:]), 0)  # mostly tokens the init did not see
    x_t, y_t = ffn_io(source.model, text)
    gaps = []
    for student in (by_teacher, by_student):
        x_s = block_inputs(student, text)
        with torch.no_grad():
            out = fff_blocks(student)[1](x_s[1])
        gaps.append(float((x_s[1] + out - x_t[1] - y_t[1]).pow(2).sum()))
    assert gaps[1] < gaps[0], gaps


def test_init_inputs_is_checked(source, tmp_path):
    with pytest.raises(InputError, match="init inputs"):
        _init_settings(source, tmp_path, init_inputs="both")
    with pytest.raises(InputError, match="end-to-end layers"):
        _init_settings(source, tmp_path, e2e_layers="first")
    with pytest.raises(InputError, match="layerwise space"):
        _init_settings(source, tmp_path, layerwise_space="input")
    with pytest.raises(InputError, match="similarity weights must be >= 0"):
        _init_settings(source, tmp_path, similarity_weight=-1.0)
    with pytest.raises(InputError, match="teacher cache must be >= 0"):
        _init_settings(source, tmp_path, teacher_cache_gb=-1.0)


def test_end_to_end_all_layers_adds_every_layers_term(source):
    """``layers="all"``: the hidden term is the mean of every layer's relative error (computed
    here by hand), ``"last"`` only the last layer's; both are 0 for the teacher itself."""
    from ultrafastbert.convert.data import TextBatch, teacher_layers
    from ultrafastbert.convert.objectives import EndToEndObjective

    ids, mask = _ids()
    text = TextBatch(ids * mask, mask)
    hidden, pooled = teacher_layers(source.model, text, "mean")
    scales = torch.tensor([2.0, 3.0])
    student = make_student(source, parse_fff("2x2", source.n_layers))
    objectives = {layers: EndToEndObjective(student, pooling="mean", hidden_scales=scales,
                                            layers=layers, cos_weight=0.0)
                  for layers in ("last", "all")}
    losses = {k: float(o(text.input_ids, mask, hidden, pooled).loss)
              for k, o in objectives.items()}
    h_s = student(input_ids=text.input_ids, attention_mask=mask,
                  output_hidden_states=True).hidden_states[1:]
    m = mask.float()
    terms = [float(((((a - b).pow(2).sum(-1) * m).sum(1) / m.sum(1)) * s).mean())
             for a, b, s in zip(h_s, hidden, scales, strict=True)]
    assert losses["last"] == pytest.approx(terms[-1], rel=1e-4)
    assert losses["all"] == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert terms[0] > 0 and terms[-1] > 0
    same = EndToEndObjective(source.model, pooling="mean", hidden_scales=scales, layers="all")
    assert float(same(text.input_ids, mask, hidden, pooled).loss) < 1e-8


def test_last_layer_objective_takes_only_the_last_teacher_layer(source):
    """``layers="last"`` gives the same loss from every layer's teacher output or the last
    one's alone; ``"all"`` refuses the last one's alone."""
    from ultrafastbert.convert.data import TextBatch, teacher_layers
    from ultrafastbert.convert.objectives import EndToEndObjective

    ids, mask = _ids()
    text = TextBatch(ids * mask, mask)
    hidden, pooled = teacher_layers(source.model, text, "mean")
    student = make_student(source, parse_fff("2x2", source.n_layers))
    scales = torch.tensor([2.0, 3.0])
    last = EndToEndObjective(student, pooling="mean", hidden_scales=scales, layers="last")
    full, alone = (float(last(ids * mask, mask, h, pooled).loss) for h in (hidden, hidden[-1:]))
    assert full == alone > 0
    wrong = float(last(ids * mask, mask, hidden[:1], pooled).loss)  # the first layer's output
    assert wrong != pytest.approx(full, rel=1e-3)
    every = EndToEndObjective(student, pooling="mean", hidden_scales=scales, layers="all")
    with pytest.raises(InputError, match="needs the teacher's 2 layers"):
        every(ids * mask, mask, hidden[-1:], pooled)


def test_similarity_error_reads_the_pairwise_cosines():
    """Zero for the teacher itself and for any per-text rescaling (cosines do not change), the
    mean squared pairwise-cosine error over the teacher's variance otherwise (by hand)."""
    from ultrafastbert.convert.objectives import similarity_error

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 5, generator=g)
    assert float(similarity_error(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    scaled = teacher * torch.rand(6, 1, generator=g).add(0.5)
    assert float(similarity_error(scaled, teacher)) == pytest.approx(0.0, abs=1e-6)
    student = teacher + 0.5 * torch.randn(6, 5, generator=g)
    cos = torch.nn.functional.cosine_similarity
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    c_s = torch.stack([cos(student[i], student[j], dim=0) for i, j in pairs])
    c_t = torch.stack([cos(teacher[i], teacher[j], dim=0) for i, j in pairs])
    by_hand = float((c_s - c_t).pow(2).mean() / c_t.var(unbiased=False))
    assert float(similarity_error(student, teacher)) == pytest.approx(by_hand, rel=1e-4)
    assert by_hand > 0.01


def test_similarity_weight_adds_the_batch_term(source):
    from ultrafastbert.convert.data import TextBatch, teacher_layers
    from ultrafastbert.convert.objectives import EndToEndObjective, similarity_error
    from ultrafastbert.model.heads import pool

    ids, mask = _ids(n=4)
    text = TextBatch(ids * mask, mask)
    hidden, pooled = teacher_layers(source.model, text, "mean")
    student = make_student(source, parse_fff("2x2", source.n_layers))
    scales = torch.tensor([2.0, 3.0])
    plain, weighted = (EndToEndObjective(student, pooling="mean", hidden_scales=scales,
                                         similarity_weight=w) for w in (0.0, 2.0))
    a, b = (o(ids * mask, mask, hidden, pooled) for o in (plain, weighted))
    pooled_s = pool(student(input_ids=ids * mask, attention_mask=mask).last_hidden_state,
                    mask, "mean")
    expected = float(a.loss) + 2.0 * float(similarity_error(pooled_s, pooled))
    assert float(b.loss) == pytest.approx(expected, rel=1e-4) and float(b.loss) > float(a.loss)
    assert "similarity" in b.parts and "similarity" not in a.parts


def _teacher_batches(source, tmp_path, **kw):
    from ultrafastbert.convert.data import TeacherBatches
    from ultrafastbert.data.packing import LengthBucketedStream

    rows = load_segments(str(tiny_corpus(tmp_path / "c.txt", n_lines=40)), source.tokenizer_dir,
                         max_len=24)
    stream = LengthBucketedStream(rows, seed=1, lengths=(rows != 0).sum(1), batch_size=8)
    return TeacherBatches(source.model, stream, batch_size=8, mode="end-to-end", pad_id=0, **kw)


def test_teacher_cache_serves_later_epochs_like_the_teacher(source, tmp_path):
    """Cached targets equal a fresh forward pass of the teacher on the same batch at every real
    token (to float rounding), within the byte cap; no cache for every layer's targets."""
    cached = _teacher_batches(source, tmp_path, layers="last", cache_bytes=2**30)
    fresh = _teacher_batches(source, tmp_path, layers="last", cache_bytes=0)
    for _ in range(15):  # 40 rows, 8 a batch: three epochs
        a, b = cached.next_batch(0, 1).inputs, fresh.next_batch(0, 1).inputs
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert a["teacher_hidden"].shape == b["teacher_hidden"].shape == (
            1, *a["input_ids"].shape, source.model.config.hidden_size)
        real = a["attention_mask"].bool()  # padding: zeros from the cache (the loss masks it)
        torch.testing.assert_close(a["teacher_hidden"][:, real], b["teacher_hidden"][:, real],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(a["teacher_pooled"], b["teacher_pooled"], atol=1e-5, rtol=0)
    assert len(cached.cache) == 40 and not fresh.cache
    other = next(iter(cached.cache.values()))[1]  # negative control: rows differ
    assert not torch.allclose(other, list(cached.cache.values())[1][1], atol=1e-3)
    small = _teacher_batches(source, tmp_path, layers="last", cache_bytes=20_000)
    for _ in range(10):
        small.next_batch(0, 1)
    assert 0 < len(small.cache) < 40 and small.cached_bytes <= 20_000
    every = _teacher_batches(source, tmp_path, layers="all", cache_bytes=2**30)
    assert every.next_batch(0, 1).inputs["teacher_hidden"].shape[0] == source.n_layers
    assert not every.cache


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_and_auto_classes(source, tmp_path):
    from transformers import AutoConfig, AutoModel

    import ultrafastbert  # noqa: F401  (registers the Auto classes)

    student = make_student(source, parse_fff("2x3,none", source.n_layers))
    student.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "ultrafastbert-bert"
    assert config["fff_layers"] == [[2, 3], None]
    back = load_converted(tmp_path / "out")
    assert isinstance(fff_blocks(back)[1], RemovedFFN)
    auto = AutoModel.from_pretrained(tmp_path / "out")
    assert type(auto) is type(back)
    assert AutoConfig.from_pretrained(tmp_path / "out").fff_layers == [[2, 3], None]
    ids, mask = _ids()
    with torch.no_grad():
        ref = student(input_ids=ids, attention_mask=mask).last_hidden_state
        for model in (back, auto):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
    other = make_student(source, parse_fff("2x3,none", source.n_layers))  # negative control
    with torch.no_grad():
        assert not torch.equal(other(input_ids=ids, attention_mask=mask).last_hidden_state, ref)


# ------------------------------------------------------------------------------ bad input
def test_not_a_bert_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="not of the BERT family"):
        load_source(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="is not a directory"):
        load_source(tmp_path / "nope")


def test_no_config(tmp_path):
    with pytest.raises(InputError, match="config.json does not exist"):
        load_source(tmp_path)


def test_unsupported_activation(tmp_path):
    with pytest.raises(ConfigError, match="activation hidden_act='relu' is not supported"):
        load_source(tiny_bert(tmp_path / "relu", hidden_act="relu"))


def test_already_converted(source, tmp_path):
    make_student(source, parse_fff("1x1", source.n_layers)).save_pretrained(tmp_path / "c")
    with pytest.raises(InputError, match="already a converted model"):
        load_source(tmp_path / "c")


def test_fff_too_wide(source):
    with pytest.raises(InputError, match="GiB of fp32 weights per layer"):
        make_student(source, parse_fff("4096x16", source.n_layers))


def test_corpus_without_text(source, tmp_path):
    (tmp_path / "empty.txt").write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises((DataError, ValueError), match="no text"):
        load_segments(str(tmp_path / "empty.txt"), source.tokenizer_dir)


# ------------------------------------------------------------------------------ the run
def _convert_args(src, out, corpus, budget="6s", *extra):
    return ["convert", str(src), "--fff", "2x3", "--out", str(out), "--budget", budget,
            "--corpus", str(corpus), "--init-tokens", "800", "--batch-size", "8",
            "--no-progress", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def converted(bert_dir, tmp_path_factory):
    from ultrafastbert.cli import main

    root = tmp_path_factory.mktemp("run")
    corpus = tiny_corpus(root / "c.txt", 400)
    assert main(_convert_args(bert_dir, root / "out", corpus)) == 0
    return root / "out", corpus


def test_run_writes_a_loadable_model_with_a_report(converted, source):
    import ultrafastbert

    out, _ = converted
    report = json.loads((out / "conversion.json").read_text())
    assert report["fff_layers"] == [[2, 3], [2, 3]]
    assert set(report["phases"]) == {"layerwise", "end-to-end"}
    for phase in report["phases"].values():  # (batches are bucketed by length, so one
        # batch's loss says little; what distillation did is measured on held-out text below)
        assert phase["steps"] > 0 and 0 < phase["last_loss"] < float("inf")
        assert phase["tokens_per_s"] == pytest.approx(phase["tokens"] / phase["seconds"])
    assert report["device"] == "cpu" and report["settings"]["device"] == "auto"
    assert not (out / "distill").exists() and not (out / ".staging").exists()
    env = report["environment"]  # which CPU and how many threads the distillation had
    assert env["cpu"] and env["torch_threads"] >= 1 and set(env["cpu_flags"]) >= {"avx2"}
    model = ultrafastbert.from_pretrained(out)
    assert type(model).__name__ == "FFFBertModel"
    # distillation moved the student towards the dense model: better than the init alone
    held, init = report["heldout"], report["init_heldout"]
    assert sum(held["block_error"]) < sum(init["block_error"]), (held, init)
    # on the ordinary tokens each block keeps part of its dense block's effect (1 = removed)
    assert len(held["post_norm_error"]) == 2 and all(0 < e < 1 for e in held["post_norm_error"])
    # non-FFN tensors are still the source's (lr_rest = 0)
    state, src_state = model.state_dict(), source.model.state_dict()
    assert torch.equal(state["embeddings.word_embeddings.weight"],
                       src_state["embeddings.word_embeddings.weight"])
    assert torch.equal(state["encoder.layer.1.attention.self.query.weight"],
                       src_state["encoder.layer.1.attention.self.query.weight"])


@pytest.mark.parametrize("lr_rest", ["0", "3e-3"])
def test_fair_ablation_with_the_feed_forward_blocks_removed(bert_dir, source, tmp_path, lr_rest):
    """``--fff none --lr-rest R``: the ablation that gets the same treatment as a conversion
    tuned at ``R``: every block's output stays zero, the rest is distilled end to end (and
    moves towards the teacher); with ``R = 0`` nothing is trained and nothing changes."""
    import ultrafastbert
    from ultrafastbert.cli import main

    corpus = tiny_corpus(tmp_path / "c.txt", 400)
    out = tmp_path / "out"
    args = _convert_args(bert_dir, out, corpus, "8s", "--lr-rest", lr_rest)
    args[args.index("--fff") + 1] = "none"
    assert main(args) == 0
    report = json.loads((out / "conversion.json").read_text())
    model = ultrafastbert.from_pretrained(out)
    blocks = fff_blocks(model)
    assert all(isinstance(b, RemovedFFN) for b in blocks) and report["active_fraction"] == 0
    x = torch.randn(3, source.model.config.hidden_size)
    assert all(torch.equal(b(x), torch.zeros_like(x)) for b in blocks)
    query = "encoder.layer.1.attention.self.query.weight"
    same = torch.equal(model.state_dict()[query], source.model.state_dict()[query])
    held, init = report["heldout"], report["init_heldout"]
    assert held["post_norm_error"] == pytest.approx([1.0, 1.0])  # removed: nothing kept
    if lr_rest == "0":
        assert report["phases"] == {} and same and held == init
    else:
        assert set(report["phases"]) == {"end-to-end"} and not same
        assert held["pooled_cosine"] > init["pooled_cosine"] + 1e-3, (held, init)


def test_post_norm_error_is_zero_for_the_dense_output_and_one_for_none():
    from ultrafastbert.convert.pipeline import post_norm_error

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    assert post_norm_error(y, x, y, norm) == 0.0
    assert post_norm_error(torch.zeros_like(y), x, y, norm) == pytest.approx(1.0)
    assert 0 < post_norm_error(y + 0.1 * torch.randn(5, 8), x, y, norm) < 0.5


def test_heldout_ordinary_tokens_leave_out_each_rows_first_and_last(source):
    import numpy as np

    from ultrafastbert.convert.pipeline import heldout_set

    rows = np.array([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]], dtype=np.int32)
    held = heldout_set(source, rows, pad_id=0)
    assert held.xs.shape[1] == 7 and len(held.norms) == source.n_layers
    assert held.ordinary.tolist() == [False, True, True, False, False, True, False]


def test_cuda_device_without_cuda_is_refused_before_any_work(bert_dir, tmp_path, capsys):
    from ultrafastbert.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    corpus = tiny_corpus(tmp_path / "c.txt", 50)
    assert main(_convert_args(bert_dir, tmp_path / "out", corpus, "6s", "--device", "cuda")) != 0
    assert "--device cuda" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before claiming the output folder


def test_refuses_a_non_empty_out(converted, bert_dir):
    from ultrafastbert.convert.pipeline import ConvertSettings, run

    out, corpus = converted
    with pytest.raises(InputError, match="already holds files"):
        run(ConvertSettings(source=bert_dir, out=out, fff="2x3", corpus=str(corpus)))


def test_resume_after_kill(bert_dir, tmp_path):
    """A real process killed mid-run (-9) resumes from its checkpoint and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    corpus = tiny_corpus(tmp_path / "c.txt", 400)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ultrafastbert.cli", *_convert_args(
        bert_dir, out, corpus, "40s", "--save-every", "1s", "--layerwise-share", "0.5")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    latest = out / "distill" / "layerwise" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.is_file(), proc.stderr.read().decode()[-2000:] if proc.poll() else "no ckpt"
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert not (out / "config.json").exists()
    from ultrafastbert.cli import main
    from ultrafastbert.convert.pipeline import claim_output_dir

    with pytest.raises(InputError, match="unfinished conversion: add --resume"):
        claim_output_dir(out, resume=False)
    assert main(_convert_args(bert_dir, out, corpus, "40s", "--resume", "--save-every", "1s",
                              "--layerwise-share", "0.5")) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["phases"]["layerwise"]["steps"] > killed_at
    assert (out / "config.json").is_file()


def test_resume_after_a_finished_phase_keeps_its_stats(bert_dir, tmp_path, monkeypatch):
    """A run stopped after the layer-wise phase and resumed: its report still gives that phase's
    tokens, seconds and losses (read back from the checkpoint and metrics), not just its steps."""
    from ultrafastbert.convert import pipeline

    corpus = tiny_corpus(tmp_path / "c.txt", 400)
    out = tmp_path / "out"
    real_distil = pipeline.distil
    first: dict = {}

    def stop_before_end_to_end(phase, *args, **kwargs):
        if phase != "layerwise":
            raise RuntimeError("stopped before end to end")
        first.update(real_distil(phase, *args, **kwargs))
        return first

    def settings(resume: bool) -> pipeline.ConvertSettings:
        return pipeline.ConvertSettings(
            source=bert_dir, out=out, fff="2x3", corpus=str(corpus), budget_s=60.0,
            max_steps=3, init_tokens=800, batch_size=8, layerwise_share=0.5, resume=resume,
            progress=False)

    monkeypatch.setattr(pipeline, "distil", stop_before_end_to_end)
    with pytest.raises(RuntimeError, match="stopped before end to end"):
        pipeline.run(settings(resume=False))
    assert first["steps"] == 3 and first["tokens"] > 0 and first["seconds"] > 0
    monkeypatch.setattr(pipeline, "distil", real_distil)
    report = pipeline.run(settings(resume=True))
    layerwise = json.loads((out / "conversion.json").read_text())["phases"]["layerwise"]
    assert layerwise["resumed_final"] is True
    for key in ("steps", "tokens", "seconds", "budget_s", "first_loss", "last_loss"):
        assert layerwise[key] == pytest.approx(first[key]), key
    assert report.phases["end-to-end"]["steps"] == 3
    assert report.phases["end-to-end"]["tokens"] > 0


# ------------------------------------------------------------------------------ pipelines
def _saved(source, tmp_path, spec="2x3"):
    student = make_student(source, parse_fff(spec, source.n_layers))
    out = tmp_path / "model"
    student.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source.tokenizer_dir).save_pretrained(out)
    return student, out


def test_predictor_embeds_like_the_model(source, tmp_path):
    from ultrafastbert.infer import Predictor

    student, out = _saved(source, tmp_path)
    predictor = Predictor.from_pretrained(out)
    texts = ["the king saw the queen.", "a dog ran by the river at night."]
    got = predictor.embed(texts)
    from ultrafastbert.convert.evaluate import embed_texts

    want = embed_texts(student, source.tokenizer_dir, texts, pooling="mean")
    want = torch.nn.functional.normalize(want, dim=-1)  # the source had a Normalize module
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))
    raw = predictor.embed(texts, normalize=False)
    assert not torch.allclose(raw, got, atol=1e-3)  # negative control: normalisation applied
    assert predictor.tasks == ("embed",)
    with pytest.raises(ValueError, match="fill-mask needs a FFFBertForMaskedLM"):
        predictor.fill_mask("the [MASK] saw")


def test_predictor_fill_mask_on_a_converted_mlm(tmp_path):
    from ultrafastbert.infer import Predictor

    src = load_source(tiny_bert(tmp_path / "mlm", task="masked-lm"))
    student, out = _saved(src, tmp_path)
    predictor = Predictor.from_pretrained(out)
    assert "fill-mask" in predictor.tasks
    result = predictor.fill_mask("the king <mask> the queen.", top_k=3)
    ids, mask = predictor.encode(["the king [MASK] the queen."])
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=mask).logits
    pos = int((ids[0] == predictor.mask_token_id).nonzero())
    assert result.candidates[0][0].token_id == int(logits[0, pos].argmax())
    assert len(result.candidates[0]) == 3


def test_predictor_classifies_pairs_with_token_types(tmp_path):
    from ultrafastbert.infer import Predictor

    src = load_source(tiny_bert(tmp_path / "cls", task="sequence-classification"))
    student, out = _saved(src, tmp_path)
    predictor = Predictor.from_pretrained(out)
    [result] = predictor.classify(["the king"], pairs=["the queen"])
    ids, mask = predictor.encode(["the king"], ["the queen"])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    assert ids.shape == types.shape
    with torch.no_grad():
        want = student(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.softmax(-1)
        untyped = student(input_ids=ids, attention_mask=mask).logits.softmax(-1)
    assert result.probability == pytest.approx(float(want.max()), abs=1e-5)
    assert not torch.allclose(want, untyped)  # negative control: the types matter here


@pytest.mark.parametrize("converted_model", [True, False], ids=["converted", "dense-source"])
def test_glue_runs_on_transformers_models(source, bert_dir, tmp_path, converted_model):
    """``ultrafastbert glue --model DIR`` on a converted model and on its dense source; the
    fine-tuned classifier reloads and predicts through the Predictor."""
    from test_glue_cli import make_glue_dir
    from ultrafastbert.cli.glue import main
    from ultrafastbert.infer import Predictor

    model_dir = _saved(source, tmp_path)[1] if converted_model else bert_dir
    out = tmp_path / "glue-out"
    rc = main(["--model", str(model_dir), "--glue-dir", str(make_glue_dir(tmp_path / "g")),
               "--tasks", "RTE,STS-B", "--epochs", "1", "--seeds", "1", "--out", str(out),
               "--max-length", "48",
               "--no-progress", "--save-models", "median"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["ff"]["kind"] == ("fff-converted" if converted_model else "dense")
    rte = results["tasks"]["RTE"]
    assert 0.0 <= rte["score"] <= 100.0
    saved = out / rte["model_dir"]
    predictor = Predictor.from_pretrained(saved)
    assert predictor.tasks == ("embed", "classify")
    [result] = predictor.classify(["the king"], pairs=["the queen"])
    assert result.label in ("entailment", "not_entailment")


def test_bench_model_takes_converted_and_dense_dirs(source, bert_dir, tmp_path):
    """``bench model --models DIR,...`` checks each (attention vs eager, every FFF vs the
    reference, routes first) before timing it."""
    from ultrafastbert.bench.model import ModelBenchSettings, run_bench

    _, converted_dir = _saved(source, tmp_path)
    settings = ModelBenchSettings(models=(str(converted_dir), str(bert_dir)), batches=(2,),
                                  seq_len=16, dtypes=("float32",), repeats=3, max_seconds=2.0,
                                  profile_batch=None)
    result = run_bench(settings)
    checks = {c["model"]: c for c in result["checks"]}
    assert checks[str(converted_dir)]["fff_layers_checked"] == 2
    assert checks[str(converted_dir)]["fff_route_agreement"] >= 0.999
    assert "fff_layers_checked" not in checks[str(bert_dir)]  # the dense source has no FFF
    assert {r["model"] for r in result["rows"]} == {str(converted_dir), str(bert_dir)}
    assert all(r["latency_ms"] > 0 for r in result["rows"])


def test_serve_embeds_a_converted_model_like_the_predictor(source, tmp_path):
    """A real server process on 127.0.0.1 answers /v1/embeddings for a converted model with
    the Predictor's vectors (normalised, as the sentence-transformers source defines)."""
    pytest.importorskip("fastapi")
    from servecheck import ServerProcess
    from ultrafastbert.infer import Predictor

    _, out = _saved(source, tmp_path)
    texts = ["the king saw the queen.", "a dog"]
    want = Predictor.from_pretrained(out).embed(texts)
    server = ServerProcess(out, log_file=tmp_path / "serve.log")
    try:
        answer = server.post("/v1/embeddings", {"input": texts, "model": out.name})
    finally:
        server.stop()
    assert answer.status == 200, answer
    got = torch.tensor([row["embedding"] for row in answer.json["data"]])
    assert torch.allclose(got, want, atol=1e-4)


def test_frontier_script_checks_then_reports(source, bert_dir, tmp_path):
    """benchmarks/convert_minilm.py on a tiny source: dense, ablation and converted rows, gain
    kept computed from them, speed measured after the kernel check."""
    import importlib.util

    from test_glue_cli import make_glue_dir

    spec = importlib.util.spec_from_file_location(
        "convert_minilm", Path(__file__).resolve().parents[1] / "benchmarks" / "convert_minilm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, model_dir = _saved(source, tmp_path)
    (model_dir / "conversion.json").write_text(json.dumps({
        "settings": {"fff": "2x3", "lr_rest": 0.0, "corpus": "c.jsonl"}, "active_fraction": 0.125, "init_s": 1.0,
        "phases": {"layerwise": {"seconds": 2.0, "tokens": 10}}, "heldout": {"pooled_cosine": 0.9}}))
    out = tmp_path / "results"
    assert script.main(["--source", str(bert_dir), "--models", str(model_dir), "--glue-dir",
                        str(make_glue_dir(tmp_path / "g")), "--out", str(out), "--threads", "1",
                        "--repeats", "3", "--speed-batch", "2", "--speed-len", "16"]) == 0
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    dense, removed, conv = rows["dense"], rows["FFNs removed (ablation)"], rows["model"]
    kept = 100 * (conv["stsb"] - removed["stsb"]) / (dense["stsb"] - removed["stsb"])
    assert conv["gain_kept_pct"] == pytest.approx(kept, abs=0.2)
    assert conv["distill_min"] == pytest.approx(0.05)
    assert (conv["corpus"], conv["init_inputs"], conv["e2e_layers"]) == ("c.jsonl", "teacher",
                                                                         "last")
    assert conv["ffn_speedup"] > 0 and conv["encoder_speedup"] > 0
    assert "| model |" in (out / "results.md").read_text()
    env = json.loads((out / "results.json").read_text())["environment"]
    assert "amx_bf16" in env["cpu_flags"] and env["dtypes"] == ["float32"]
    assert env["cpu"] in (out / "results.md").read_text()


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_topk_bound_oracle_keeps_each_tokens_largest_contributions():
    """The per-token oracle keeps exactly k contributions, the largest: all W of them give the
    dense output back, fewer can only lose (checked against a by-hand choice)."""
    bound = _script("ffn_topk_bound")
    torch.manual_seed(0)
    a, w2 = torch.randn(5, 12), torch.randn(12, 4)
    assert torch.allclose(bound.oracle(a, w2, 12), a @ w2, atol=1e-5)
    want = torch.stack([sum(a[t, j] * w2[j] for j in (a[t].abs() * w2.norm(dim=1)).argsort()[-3:])
                        for t in range(5)])
    assert torch.allclose(bound.oracle(a, w2, 3), want, atol=1e-5)
    errs = [float((bound.oracle(a, w2, k) - a @ w2).pow(2).sum()) for k in (1, 3, 6, 12)]
    assert errs == sorted(errs, reverse=True) and errs[0] > 0


def test_topk_bound_script_reports_every_layer_against_removal(source, bert_dir, tmp_path):
    """benchmarks/ffn_topk_bound.py on a tiny source: one row per layer, oracle errors that
    fall with k, the FFF init measured the same way, and the CPU facts."""
    out = tmp_path / "bound"
    _, model_dir = _saved(source, tmp_path)
    assert _script("ffn_topk_bound").main([
        "--source", str(bert_dir), "--corpus", str(tiny_corpus(tmp_path / "c.txt", 200)),
        "--held-out", "16", "--init", "2x2", "--init-tokens", "400", "--threads", "1",
        "--models", str(model_dir), "--out", str(out)]) == 0
    result = json.loads((out / "bound.json").read_text())
    assert len(result["layers"]) == source.n_layers
    for row in result["layers"]:
        posts = [v["post_norm"] for v in row["oracle"].values()]
        assert len(posts) >= 2 and posts == sorted(posts, reverse=True) and posts[-1] >= 0
        assert row["init"]["fff"] == "2x2" and 0 <= row["init"]["post_norm"] < 10
        assert 0 <= row["models"][model_dir.name]["post_norm"] < 10
    assert "amx_bf16" in result["environment"]["cpu_flags"]


def test_layer_attribution_script_checks_then_reports(source, bert_dir, tmp_path, monkeypatch):
    """benchmarks/convert_layer_attribution.py: every layer's block put back, or converted
    alone; its check (all blocks put back = the dense score) fails when putting back does
    nothing."""
    import contextlib

    from test_glue_cli import make_glue_dir

    script = _script("convert_layer_attribution")
    _, model_dir = _saved(source, tmp_path)
    args = ["--source", str(bert_dir), "--glue-dir", str(make_glue_dir(tmp_path / "g")),
            "--models", str(model_dir), "--out", str(tmp_path / "r"), "--threads", "1"]
    assert script.main(args) == 0
    dense, row = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    n = source.n_layers
    assert {f"dense_at_{i}" for i in range(n)} | {f"only_fff_at_{i}" for i in range(n)} <= set(row)
    assert row["only_fff_loss_sum"] == pytest.approx(
        sum(dense["stsb"] - row[f"only_fff_at_{i}"] for i in range(n)), abs=0.02)
    assert -1 <= row["stsb_pooled_cos"] <= 1 and row["stsb"] != dense["stsb"]
    monkeypatch.setattr(script, "dense_blocks", lambda *a: contextlib.nullcontext())
    with pytest.raises(SystemExit, match="check failed"):
        script.main(args)
