"""The native kernel's knobs and their autotuning never change results; the tuning cache.

Every knob setting must give bit-identical routes and values (fp32) to the defaults, and both must
match the float64 reference, on odd shapes (1 and 13 tokens, width 37), several trees, d=384 and
768, depth 0. The cache is written atomically, a corrupt one is ignored with a warning and
remeasured, and ``ULTRAFASTBERT_AUTOTUNE=0`` measures nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random

import pytest
import torch

from test_native import FP32_MARGIN, _native, check_routes, check_values, make_inputs, make_weights
from ultrafastbert.fff.native import tuning
from ultrafastbert.fff.reference import fff_reference

CPU = torch.device("cpu")

SHAPES = [  # (n_trees, depth, d, tokens)
    (1, 11, 768, 13),
    (1, 7, 37, 300),  # one deep tree, enough tokens for the bucketed walk
    (3, 4, 37, 13),
    (8, 7, 384, 130),
    (32, 5, 384, 1),
    (32, 5, 384, 13),
    (5, 0, 37, 13),
    (16, 6, 768, 70),
    (4, 2, 384, 1),
]


def knob_rows(count: int, seed: int = 0) -> list[dict[str, int]]:
    """Extreme knob settings plus ``count`` random ones (every knob over its valid range)."""
    rnd = random.Random(seed)
    space = {"group": (1, 2, 4, 8), "trees_together": (0, 1), "prefetch": (0, 1),
             "bucket": (0, 1, 8, 1000), "grain": (1, 1 << 18, 1 << 40), "block": (0, 1, 3, 64),
             "sort": (0, 1), "split": (0, 1)}
    rows = [dict(zip(space, values, strict=True)) for values in
            itertools.product(*[(v[0], v[-1]) for v in space.values()])][:8]
    rows += [{**r, "sort": 1, "block": b} for r in rows[:2] for b in (3, 64, 1000)]
    rows += [{**r, "split": 1, "block": b} for r in rows[:2] for b in (1, 5, 64)]
    rows += [{k: rnd.choice(v) for k, v in space.items()} for _ in range(count)]
    return [{"min_tokens": 0, **r} for r in rows]


def run_with(kernel, packed, x, n_trees, depth, table):
    return kernel.forward(x, dataclasses.replace(packed, knobs=table), n_trees, depth,
                          return_nodes=True)


@pytest.mark.parametrize(("n_trees", "depth", "d", "tokens"), SHAPES)
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_every_knob_setting_gives_the_same_bits(isa, n_trees, depth, d, tokens):
    if isa == "avx512" and tuning.build.cpu_isa() != "avx512":
        pytest.skip("this CPU has no AVX-512 (the AVX2 case still runs)")
    kernel = _native(isa)
    weights = make_weights(n_trees, depth, d, seed=n_trees + depth)
    x = make_inputs(tokens, d)
    ref = fff_reference(x, *weights, n_trees, depth)
    packed = kernel.pack(*weights, n_trees, depth, "fp32")
    y0, nodes0 = run_with(kernel, packed, x, n_trees, depth, tuning.default_table(n_trees))
    # 32 trees make ~160 decisions per token: a few of 13 tokens may sit near a boundary.
    same = check_routes(nodes0, ref.nodes, ref.logits, FP32_MARGIN, max_excluded=0.25)
    assert same.sum() >= tokens * 0.75
    check_values(y0, ref.y, same, rtol=1e-4, atol=1e-5)
    threads = torch.get_num_threads()
    for i, row in enumerate(knob_rows(12, seed=tokens)):
        torch.set_num_threads(1 + i % 2)  # grain 1 with 2 threads splits every 8 tokens
        try:
            y, nodes = run_with(kernel, packed, x, n_trees, depth, tuning.to_table([row]))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(nodes, nodes0), f"routes changed with knobs {row}"
        assert torch.equal(y, y0), f"values changed with knobs {row}"


def test_knob_check_can_fail():
    """Negative control: the bit-identity check sees a one-ulp change of one value."""
    kernel = _native()
    weights = make_weights(3, 4, 37)
    x = make_inputs(13, 37)
    packed = kernel.pack(*weights, 3, 4, "fp32")
    y0, _ = run_with(kernel, packed, x, 3, 4, tuning.default_table(3))
    y1 = y0.clone()
    y1[5, 3] = torch.nextafter(y1[5, 3], torch.tensor(float("inf")))
    assert not torch.equal(y0, y1)


def test_multi_row_table_switches_by_token_count():
    """Rows apply by token count (a call of 5 tokens takes the second row): still the same bits."""
    kernel = _native()
    weights = make_weights(8, 3, 37)
    packed = kernel.pack(*weights, 8, 3, "fp32")
    x = make_inputs(300, 37)
    table = tuning.to_table([
        {"min_tokens": 0, "group": 1, "trees_together": 0, "prefetch": 1, "bucket": 0,
         "grain": 1, "block": 0, "sort": 0, "split": 0},
        {"min_tokens": 5, "group": 2, "trees_together": 1, "prefetch": 0, "bucket": 8,
         "grain": 1 << 18, "block": 3, "sort": 1, "split": 0},
        {"min_tokens": 100, "group": 8, "trees_together": 0, "prefetch": 1, "bucket": 1,
         "grain": 7, "block": 64, "sort": 0, "split": 1}])
    reference = run_with(kernel, packed, x, 8, 3, tuning.default_table(8))
    for tokens in (1, 5, 99, 300):
        y, nodes = run_with(kernel, packed, x[:tokens].contiguous(), 8, 3, table)
        assert torch.equal(y, reference[0][:tokens]) and torch.equal(nodes, reference[1][:tokens])


@pytest.mark.parametrize("bad", [
    {"group": 3}, {"group": 0}, {"trees_together": 2}, {"prefetch": -1}, {"bucket": -1},
    {"grain": 0}, {"block": -5}, {"min_tokens": 7}, {"sort": 2}, {"sort": -1},
    {"split": 3}])
def test_bad_knobs_are_rejected(bad):
    kernel = _native()
    weights = make_weights(2, 2, 37)
    packed = kernel.pack(*weights, 2, 2, "fp32")
    row = {**tuning.default_row(0, 2), **bad}
    with pytest.raises(RuntimeError, match="fff_cpu_forward_tuned"):
        run_with(kernel, packed, make_inputs(3, 37), 2, 2, tuning.to_table([row]))


# ------------------------------------------------------------------------------ autotuning

@pytest.fixture
def tuning_on(tmp_path, monkeypatch):
    """Autotuning on, a private cache, small measurements; yields the cache file's path."""
    _native()  # loaded (from the usual cache) before the cache root moves to tmp_path
    monkeypatch.delenv("ULTRAFASTBERT_AUTOTUNE", raising=False)
    monkeypatch.setenv("ULTRAFASTBERT_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "TOKEN_CLASSES", ((0, 1), (8, 40)))
    monkeypatch.setattr(tuning, "SAMPLE_S", 0.0002)
    monkeypatch.setattr(tuning, "SAMPLES", 1)
    tuning._MEMO.clear()
    yield tuning.cache_path()
    tuning._MEMO.clear()


def count_measurements(monkeypatch) -> list:
    calls: list = []
    real = tuning.measure

    def counted(shape, run, *defaults):
        calls.append(shape.key)
        return real(shape, run, *defaults)

    monkeypatch.setattr(tuning, "measure", counted)
    return calls


def pack(kernel, n_trees=4, depth=3, d=37, seed=0):
    return kernel.pack(*make_weights(n_trees, depth, d, seed=seed), n_trees, depth, "fp32")


def test_tuned_knobs_are_measured_once_cached_and_change_nothing(tuning_on, monkeypatch):
    from ultrafastbert.fff.native.kernel import NativeCPUKernel

    calls = count_measurements(monkeypatch)
    kernel = NativeCPUKernel()
    packed = pack(kernel)
    assert calls == [f"4x3/d37/fp32/t{torch.get_num_threads()}"]
    data = json.loads(tuning_on.read_text())
    (entries,) = data["kernels"].values()
    assert data["version"] == tuning.CACHE_VERSION and list(entries) == calls
    assert tuning.from_table(packed.knobs) == entries[calls[0]]["rows"]
    assert not list(tuning_on.parent.glob(".*.tmp"))  # the atomic writer left nothing behind
    # Results: the tuned table gives the defaults' bits.
    x = make_inputs(41, 37)
    tuned = kernel.forward(x, packed, 4, 3, return_nodes=True)
    fixed = run_with(kernel, packed, x, 4, 3, tuning.default_table(4))
    assert torch.equal(tuned[0], fixed[0]) and torch.equal(tuned[1], fixed[1])
    # Same process: remembered; a new process (memo cleared): read from the file.
    pack(kernel, seed=1)
    tuning._MEMO.clear()
    again = pack(kernel, seed=2)
    assert calls == [calls[0]] and torch.equal(again.knobs, packed.knobs)
    pack(kernel, n_trees=2)  # another shape is measured and added beside the first
    (entries,) = json.loads(tuning_on.read_text())["kernels"].values()
    assert len(calls) == 2 and len(entries) == 2


@pytest.mark.parametrize("load", [0.5, 9.0])
def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(tuning_on, monkeypatch, caplog,
                                                                load):
    from ultrafastbert.fff.native.kernel import NativeCPUKernel

    monkeypatch.delenv(tuning.BUSY_ENV, raising=False)
    monkeypatch.setattr(tuning.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    busy = load > 2
    assert (tuning.busy_reason() is not None) == busy
    calls = count_measurements(monkeypatch)
    kernel = NativeCPUKernel()
    with caplog.at_level(logging.WARNING, logger=tuning.__name__):
        pack(kernel)
        pack(kernel)  # the same process: its memo, measured or not cached
    assert len(calls) == 1
    assert tuning_on.exists() != busy
    assert ("busy machine" in caplog.text) == busy
    tuning._MEMO.clear()  # a later process: measures again only when nothing was cached
    pack(kernel)
    assert len(calls) == (2 if busy else 1)
    monkeypatch.setenv(tuning.BUSY_ENV, "1")  # the switch: cached whatever the load
    assert tuning.busy_reason() is None


def test_cache_is_written_with_the_atomic_writer(tuning_on, monkeypatch):
    writes = []
    real = tuning.atomic_write_json
    monkeypatch.setattr(tuning, "atomic_write_json",
                        lambda path, obj: (writes.append(path), real(path, obj)))
    pack(_native())
    assert writes == [tuning_on]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 99, "kernels": {}}'])
def test_corrupt_cache_is_ignored_with_a_warning_and_remeasured(tuning_on, monkeypatch, caplog,
                                                                 content):
    tuning_on.parent.mkdir(parents=True, exist_ok=True)
    tuning_on.write_text(content)
    calls = count_measurements(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ultrafastbert.fff.native.tuning"):
        pack(_native())
    assert len(calls) == 1
    assert any("ignoring" in r.message and "knobs cache" in r.message for r in caplog.records)
    assert json.loads(tuning_on.read_text())["version"] == tuning.CACHE_VERSION  # rewritten


def test_malformed_entry_is_remeasured(tuning_on, monkeypatch, caplog):
    from ultrafastbert.fff.native.kernel import NativeCPUKernel

    kernel = NativeCPUKernel()
    pack(kernel)
    data = json.loads(tuning_on.read_text())
    (entries,) = data["kernels"].values()
    (entry,) = entries.values()
    entry["rows"] = [{"min_tokens": 0}]  # knobs missing
    tuning_on.write_text(json.dumps(data))
    tuning._MEMO.clear()
    calls = count_measurements(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ultrafastbert.fff.native.tuning"):
        pack(kernel)
    assert len(calls) == 1 and any("malformed" in r.message for r in caplog.records)


def test_switch_off_measures_nothing(tuning_on, monkeypatch):
    monkeypatch.setenv("ULTRAFASTBERT_AUTOTUNE", "0")
    monkeypatch.setattr(tuning, "measure", lambda *a: pytest.fail("measured with tuning off"))
    packed = pack(_native())
    assert torch.equal(packed.knobs, tuning.default_table(4))
    assert not tuning_on.exists()


def test_clear_forgets_the_cache(tuning_on, monkeypatch):
    pack(_native())
    assert tuning_on.exists() and tuning.clear() and not tuning_on.exists()
    calls = count_measurements(monkeypatch)
    pack(_native())
    assert len(calls) == 1


def fake_timing(monkeypatch, cost, spiky: bool):
    """Replace the clock: a sample of a knobs table costs ``cost(row)``, and with ``spiky``
    every other sample is 10x slower (another process took the core)."""
    counter = iter(range(10**6))
    monkeypatch.setattr(tuning, "_calls_per_sample", lambda run, x, table: 1)

    def sample(run, x, table, calls):
        (row,) = tuning.from_table(table)
        return cost(row) * (10.0 if spiky and next(counter) % 2 else 1.0)

    monkeypatch.setattr(tuning, "_sample", sample)


@pytest.mark.parametrize("spiky", [False, True])
def test_tuner_finds_a_clearly_faster_knob_and_ignores_load_spikes(monkeypatch, spiky):
    shape = tuning.Shape(8, 7, 384, "fp32", 1)
    x = torch.zeros(256, 384)
    start = tuning.default_row(64, 8)
    fake_timing(monkeypatch, lambda row: 1.0, spiky)  # every setting equally fast
    assert tuning._tune_class(start, shape, x, None)[0] == start
    fake_timing(monkeypatch, lambda row: 0.7 if row["block"] == 256 else 1.0, spiky)
    chosen, base_s, best_s = tuning._tune_class(start, shape, x, None)
    assert chosen == {**start, "block": 256} and best_s == pytest.approx(0.7)
    # A 2% gain is noise (below MIN_GAIN): the default stays.
    fake_timing(monkeypatch, lambda row: 0.98 if row["prefetch"] else 1.0, spiky)
    assert tuning._tune_class(start, shape, x, None)[0] == start


@pytest.mark.parametrize("spiky", [False, True])
def test_tuner_takes_the_split_walk_when_clearly_faster(monkeypatch, spiky):
    """The split and sorted walks are candidates like any knob: chosen only when >= MIN_GAIN
    faster, whatever load spikes do to every other sample."""
    shape = tuning.Shape(8, 7, 384, "fp32", 2)
    x = torch.zeros(256, 384)
    start = tuning.default_row(64, 8)
    fake_timing(monkeypatch, lambda row: 0.5 if row["split"] else 1.0, spiky)
    chosen, _, best_s = tuning._tune_class(start, shape, x, None)
    assert chosen["split"] == 1 and best_s == pytest.approx(0.5)
    fake_timing(monkeypatch, lambda row: 0.8 if row["sort"] and not row["split"] else 1.0, spiky)
    chosen, _, best_s = tuning._tune_class(start, shape, x, None)
    assert chosen == {**start, "sort": 1} and best_s == pytest.approx(0.8)
    fake_timing(monkeypatch, lambda row: 0.97 if row["split"] else 1.0, spiky)  # noise
    assert tuning._tune_class(start, shape, x, None)[0] == start


def test_tuner_times_only_the_knobs_that_matter():
    one = tuning.Shape(1, 11, 768, "fp32", 1)
    many = tuning.Shape(32, 5, 384, "fp32", 2)
    row = tuning.default_row(64, 32)
    assert not tuning.relevant("block", one, 256, row)
    assert not tuning.relevant("grain", one, 256, row)  # one thread
    assert tuning.relevant("grain", many, 256, row) and tuning.relevant("block", many, 256, row)
    assert not tuning.relevant("trees_together", many, 256, row)  # blocks ignore it
    assert tuning.relevant("trees_together", many, 1, row)
    assert not tuning.relevant("bucket", many, 4096, row)
    assert tuning.relevant("bucket", one, 4096, row) and not tuning.relevant("group", one, 1, row)
    assert tuning.relevant("split", many, 256, row) and not tuning.relevant("split", many, 1, row)
    assert not tuning.relevant("split", one, 256, row)
    split = {**row, "split": 1}
    assert not tuning.relevant("sort", many, 256, split)  # the split walk always sorts
    assert not tuning.relevant("group", many, 256, split)
    assert tuning.relevant("block", many, 256, split)


def test_default_tables_take_the_untuned_op_with_the_same_bits():
    kernel = _native()
    weights = make_weights(8, 3, 37)
    packed = kernel.pack(*weights, 8, 3, "fp32")
    assert packed.untuned and packed.n_trees == 8
    other = dataclasses.replace(packed, knobs=tuning.to_table(
        [{**tuning.default_row(0, 8), "group": 2}]))
    assert not other.untuned  # replacing the knobs re-derives it
    x = make_inputs(13, 37)
    assert torch.equal(kernel.forward(x, packed, 8, 3)[0], kernel.forward(x, other, 8, 3)[0])


@pytest.mark.parametrize("knobs", [{"sort": 1, "block": 64}, {"sort": 1, "block": 3},
                                   {"split": 1, "block": 64}, {"split": 1, "block": 1}])
def test_sorted_and_split_walks_send_exact_zero_logits_left(knobs):
    """Ties at zero logits with several trees on the sorted and split walks: every tree's root
    logit is exactly 0 for a third of the tokens (left), a tiny positive for another (right)."""
    kernel = _native()
    n_trees, d, tokens = 5, 384, 40
    w_in = torch.zeros(n_trees * 3, d)
    for tree in range(n_trees):
        w_in[3 * tree, 2 * tree:2 * tree + 2] = torch.tensor([1.0, -1.0])  # x_a - x_b
        w_in[3 * tree + 1, 0], w_in[3 * tree + 2, 0] = 0.5, -0.25
    w_out = torch.randn(d, n_trees * 3, generator=torch.Generator().manual_seed(1))
    weights = (w_in, torch.zeros(n_trees * 3), w_out)
    x = torch.zeros(tokens, d)
    x[:, : 2 * n_trees] = 0.75
    x[1::3, 1 : 2 * n_trees : 2] = 0.75 - 2.0**-20  # x_a - x_b > 0: right
    x[2::3, 0 : 2 * n_trees : 2] = 0.75 - 2.0**-20  # < 0: left
    ref = fff_reference(x, *weights, n_trees, 1)
    assert (ref.logits[0::3, :, 0] == 0).all()  # the ties are real
    packed = kernel.pack(*weights, n_trees, 1, "fp32")
    row = {**tuning.default_row(2, n_trees), **knobs, "min_tokens": 0}
    y, nodes = run_with(kernel, packed, x, n_trees, 1, tuning.to_table([row]))
    assert nodes[0::3, :, 1].eq(torch.arange(n_trees) * 3 + 1).all()  # ties went left
    assert torch.equal(nodes, ref.nodes)
    check_values(y, ref.y, torch.ones(tokens, dtype=torch.bool), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_bf16_and_int8_kernels_are_tuned_too(tuning_on, monkeypatch, kind):
    """The bf16 and int8-weight kernels take tuned knobs like the fp32 one (the bf16 one from
    its own defaults): measured once per shape, cached under their own key, same bits."""
    from ultrafastbert.fff.native.kernel import NativeBF16Kernel, NativeInt8Kernel

    make = NativeBF16Kernel if kind == "bf16" else NativeInt8Kernel
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    fmt = "fp32" if kind == "bf16" else "int8"
    if make().unavailable_reason(torch.device("cpu"), dtype, fmt) is not None:
        pytest.skip("native kernel unavailable")
    calls = count_measurements(monkeypatch)
    weights = make_weights(4, 3, 37)
    tuned = make().pack(*weights, 4, 3, fmt)
    again = make().pack(*weights, 4, 3, fmt)
    assert calls == [f"4x3/d37/{kind}/t{torch.get_num_threads()}"]  # the second from the cache
    assert torch.equal(tuned.knobs, again.knobs)
    fixed = make(tune=False).pack(*weights, 4, 3, fmt)
    assert fixed.untuned
    x = make_inputs(40, 37).to(dtype)
    kernel = make()
    for a, b in zip(kernel.forward(x, tuned, 4, 3, return_nodes=True),
                    kernel.forward(x, fixed, 4, 3, return_nodes=True), strict=True):
        assert torch.equal(a, b)
