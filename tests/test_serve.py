"""``ultrafastbert serve`` as a real server process on 127.0.0.1: every endpoint against the
Python API, concurrency, bad input, batching, request logging, metrics and shutdown."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import random
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import modelcheck

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("tokenizers")

from servecheck import ServerProcess, metric, request  # noqa: E402
from ultrafastbert.cli import main as cli_main  # noqa: E402
from ultrafastbert.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from ultrafastbert.infer import Predictor  # noqa: E402
from ultrafastbert.model import (  # noqa: E402
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
)

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "bird", "sang", "song", "big", "red", "old", "tree"]
CORPUS = [" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(40)]
#: Longer than the tiny models' 16 positions.
LONG = "the big red dog ran in the old park and the bird sang a song on the tree " * 2


def texts(n: int, seed: int, words: int = 12) -> list[str]:
    """``n`` different texts of 2 to ``words`` + 1 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, words))) + f" {WORDS[i % 17]}"
            for i in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    tok = save_tokenizer(train_tokenizer(CORPUS, vocab_size=128), folder / "tok")
    torch.manual_seed(0)
    config = modelcheck.mini(vocab_size=128)
    UltraFastBertForMaskedLM(config).save_pretrained(folder / "mlm", tokenizer_file=tok)
    clf = UltraFastBertForSequenceClassification(
        modelcheck.mini(vocab_size=128, num_labels=3, label_names=("a", "b", "c")))
    clf.save_pretrained(folder / "clf", tokenizer_file=tok)
    return folder


@pytest.fixture(scope="module")
def mlm(models):
    """The MLM server: batches wait up to 200 ms for company; small request limits."""
    server = ServerProcess(models / "mlm", "--max-wait-ms", "200", "--max-inputs", "40",
                           "--max-request-tokens", "300", "--max-body-bytes", "20000",
                           "--model-name", "tiny-mlm", log_file=models / "mlm.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clf(models):
    """The classifier server: refuses long texts; a batch holds one 16-token text at most."""
    server = ServerProcess(models / "clf", "--no-truncate", "--max-batch-tokens", "16",
                           log_file=models / "clf.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlm_api(models):
    return Predictor.from_pretrained(models / "mlm")


# --------------------------------------------------------------------- results = Python API
def test_embeddings_equal_the_python_api(mlm, mlm_api):
    batch = [*texts(5, seed=1), LONG]
    r = mlm.post("/v1/embeddings", {"input": batch, "model": "tiny-mlm", "user": "x"})
    assert r.status == 200, r
    assert r.json["object"] == "list" and r.json["model"] == "tiny-mlm"
    assert [d["index"] for d in r.json["data"]] == list(range(6))
    got = torch.tensor([d["embedding"] for d in r.json["data"]])
    want = mlm_api.embed(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-2  # different texts, different vectors
    tokens = sum(len(row) for row in mlm_api.tokenize(batch))
    assert r.json["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    one = mlm.post("/v1/embeddings", {"input": batch[2], "encoding_format": "base64"})
    assert one.status == 200 and len(one.json["data"]) == 1
    vector = np.frombuffer(base64.b64decode(one.json["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(vector.copy()), want[2], atol=1e-5, rtol=1e-5)


def test_fill_mask_equals_the_python_api(mlm, mlm_api):
    for text in ("the cat <mask> on the mat", "a [MASK] ran in the <mask>"):
        r = mlm.post("/v1/fill-mask", {"input": text, "top_k": 3})
        assert r.status == 200, r
        [row] = r.json["data"]
        want = mlm_api.fill_mask(text, top_k=3)
        assert row["text"] == want.text and row["filled"] == want.filled
        assert len(row["masks"]) == len(want.candidates) == text.count("MASK") + text.count(
            "<mask>")
        for got, expected in zip(row["masks"], want.candidates, strict=True):
            assert [c["token_id"] for c in got] == [c.token_id for c in expected]
            assert [c["probability"] for c in got] == pytest.approx(
                [c.probability for c in expected], abs=1e-6)


def test_classify_equals_the_python_api(clf, models):
    api = Predictor.from_pretrained(models / "clf")
    first, second = texts(4, seed=2, words=3), texts(4, seed=3, words=3)
    r = clf.post("/v1/classify", {"input": first, "pair": second})
    assert r.status == 200, r
    want = api.classify(first, second)
    for got, expected in zip(r.json["data"], want, strict=True):
        assert got["label"] == expected.label and got["value"] is None
        assert got["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
        assert got["probability"] == pytest.approx(expected.probability, abs=1e-5)
    alone = clf.post("/v1/classify", {"input": first[0]})
    assert alone.json["data"][0]["probabilities"] == pytest.approx(
        api.classify(first[:1])[0].probabilities, abs=1e-5)


def test_a_model_process_answers_like_the_python_api(models, mlm_api):
    """``--model-process`` (with two workers: two children): every task's results as the
    Python API's, computed in the children."""
    server = ServerProcess(models / "mlm", "--model-process", "--workers", "2",
                           log_file=models / "mlm-process.log")
    clf_server = ServerProcess(models / "clf", "--model-process",
                               log_file=models / "clf-process.log")
    try:
        assert "the model runs in 2 child process(es)" in server.log()
        batch = [*texts(5, seed=4), LONG]
        r = server.post("/v1/embeddings", {"input": batch})
        assert r.status == 200, r
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in r.json["data"]]),
                                   mlm_api.embed(batch), atol=1e-5, rtol=1e-5)
        assert r.json["usage"]["prompt_tokens"] == sum(map(len, mlm_api.tokenize(batch)))
        one = server.post("/v1/embeddings", {"input": batch[1], "encoding_format": "base64"})
        vector = np.frombuffer(base64.b64decode(one.json["data"][0]["embedding"]), dtype="<f4")
        torch.testing.assert_close(torch.from_numpy(vector.copy()), mlm_api.embed(batch)[1],
                                   atol=1e-5, rtol=1e-5)
        text = "the cat <mask> on the mat"
        [row] = server.post("/v1/fill-mask", {"input": text, "top_k": 3}).json["data"]
        want = mlm_api.fill_mask(text, top_k=3)
        assert row["filled"] == want.filled
        assert [c["token_id"] for c in row["masks"][0]] == [
            c.token_id for c in want.candidates[0]]
        first = texts(3, seed=5, words=3)
        got = clf_server.post("/v1/classify", {"input": first}).json["data"]
        expected = Predictor.from_pretrained(models / "clf").classify(first)
        assert [g["label"] for g in got] == [e.label for e in expected]
        assert got[0]["probabilities"] == pytest.approx(expected[0].probabilities, abs=1e-5)
    finally:
        statuses = [server.stop()[0], clf_server.stop()[0]]
    assert statuses == [0, 0]


def test_health_models_and_metrics(mlm):
    health = mlm.request("GET", "/health")
    assert health.status == 200 and health.json["status"] == "ok"
    assert health.json["tasks"] == ["embed", "fill-mask"]
    # No bound given: sized from the speed measured at start (half of the 1000 ms deadline),
    # then from the rate the server drains its queue at, once it has been busy a second.
    limits = health.json["limits"]
    assert limits["measured_tokens_per_s"] > 0 and limits["max_queue_ms"] == 1000
    start = limits["max_queue_tokens_at_start"]
    assert abs(start - max(16, limits["measured_tokens_per_s"] * 0.5)) <= 1
    served = limits["served_tokens_per_s"]
    want = start if served is None else max(int(start * 0.25), int(served * 0.5))
    assert abs(limits["max_queue_tokens"] - want) <= 1  # /health rounds the rate
    assert limits["max_concurrent_requests"] == min(1024, max(16, limits["max_queue_tokens"]
                                                            // 16))
    models = mlm.request("GET", "/v1/models").json
    [card] = models["data"]
    assert card["id"] == "tiny-mlm" and card["dimensions"] == 32 and card["max_length"] == 16
    assert mlm.request("GET", "/v1/models/tiny-mlm").json["id"] == "tiny-mlm"
    assert mlm.request("GET", "/v1/models/other").status == 404
    mlm.post("/v1/embeddings", {"input": ["the cat", "a dog"]})
    scrape = mlm.request("GET", "/metrics")
    assert scrape.status == 200 and scrape.headers["content-type"].startswith("text/plain")
    text = scrape.body.decode()
    assert metric(text, "ultrafastbert_requests_total", endpoint="/v1/embeddings",
                  status="200") >= 1
    assert metric(text, "ultrafastbert_inputs_total", endpoint="/v1/embeddings") >= 2
    assert metric(text, "ultrafastbert_batches_total", task="embed", outcome="ok") >= 1
    assert metric(text, "ultrafastbert_requests_total", endpoint="/nope") == 0  # control


def test_requests_are_logged(mlm):
    mlm.post("/v1/embeddings", {"input": ["the cat sat", "a dog"]})
    line = r"POST /v1/embeddings 200 inputs=2 tokens=\d+ [\d.]+ ms"
    deadline = time.monotonic() + 20  # the line is written just after the response is sent
    while not re.search(line, mlm.log()):
        assert time.monotonic() < deadline, mlm.log()[-2000:]
        time.sleep(0.05)


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_requests_each_get_their_own_result(mlm, mlm_api):
    requests = [texts(1 + i % 3, seed=100 + i) for i in range(48)]
    want = [mlm_api.embed(batch) for batch in requests]

    def call(batch: list[str]):
        return mlm.post("/v1/embeddings", {"input": batch})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, requests))
    for answer, expected in zip(answers, want, strict=True):
        assert answer.status == 200, answer
        got = torch.tensor([d["embedding"] for d in answer.json["data"]])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # A swap would be caught: the requests' vectors all differ.
    firsts = torch.stack([w[0] for w in want])
    assert torch.cdist(firsts, firsts).add(torch.eye(len(firsts)) * 9).min() > 1e-3


def test_bad_requests_do_not_fail_their_batch_mates(mlm, mlm_api):
    good = texts(6, seed=7)
    bodies = [{"input": t} if i % 2 == 0 else {"input": [t, 3]} for i, t in enumerate(good)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: mlm.post("/v1/embeddings", b), bodies))
    for i, answer in enumerate(answers):
        if i % 2:
            assert answer.status == 422 and "item 1 is a number" in answer.json["error"]["message"]
        else:
            got = torch.tensor(answer.json["data"][0]["embedding"])
            torch.testing.assert_close(got, mlm_api.embed([good[i]])[0], atol=1e-5, rtol=1e-5)


def test_concurrent_fill_mask_with_different_top_k(mlm, mlm_api):
    """Requests with different ``top_k`` never share a batch, and each gets its own answer."""
    cases = [(f"{t} <mask>", 1 + i % 3) for i, t in enumerate(texts(9, seed=21, words=4))]
    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(
            lambda c: mlm.post("/v1/fill-mask", {"input": c[0], "top_k": c[1]}), cases))
    for (text, k), answer in zip(cases, answers, strict=True):
        assert answer.status == 200, answer
        [row] = answer.json["data"]
        want = mlm_api.fill_mask(text, top_k=k)
        assert row["text"] == text and len(row["masks"][0]) == k
        assert [c["probability"] for c in row["masks"][0]] == pytest.approx(
            [c.probability for c in want.candidates[0]], abs=1e-5)


def _batches(server) -> tuple[float, float]:
    text = server.request("GET", "/metrics").body.decode()
    return (metric(text, "ultrafastbert_batches_total", task="embed", outcome="ok"),
            metric(text, "ultrafastbert_batch_rows_sum", task="embed"))


def _burst(server, n: int, base: str = LONG) -> list:
    """``n`` one-text requests sent at the same moment."""
    start = threading.Barrier(n)

    def call(i: int):
        start.wait()
        return server.post("/v1/embeddings", {"input": f"{base} {WORDS[i]}"})

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def test_concurrent_requests_share_batches(mlm, clf):
    before, rows_before = _batches(mlm)
    assert all(a.status == 200 for a in _burst(mlm, 16))
    after, rows_after = _batches(mlm)
    assert rows_after - rows_before == 16
    assert after - before <= 8, f"16 requests took {after - before} model calls"
    # Control: a budget of 16 padded tokens puts each 11-token text in its own batch.
    before, _ = _batches(clf)
    assert all(a.status == 200 for a in _burst(clf, 8, base="the big red dog ran in the park"))
    assert _batches(clf)[0] - before == 8


# ------------------------------------------------------------------------------- bad input
BAD = [
    # (method, path, JSON body or raw bytes, headers, status, words in the message)
    ("POST", "/v1/embeddings", b"{bad json", {"Content-Type": "application/json"}, 400,
     "not valid JSON"),
    ("POST", "/v1/embeddings", b"", {"Content-Type": "application/json"}, 400, "no body"),
    ("POST", "/v1/embeddings", b'{"input": "x"}', {"Content-Type": "text/plain"}, 415,
     "Content-Type"),
    ("POST", "/v1/embeddings", [1, 2], None, 422, "object"),
    ("POST", "/v1/embeddings", {"input": 3}, None, 422, "string or a list of strings"),
    ("POST", "/v1/embeddings", {"input": None}, None, 422, "not null"),
    ("POST", "/v1/embeddings", {"input": []}, None, 422, "empty list"),
    ("POST", "/v1/embeddings", {"input": ["a", {"b": 1}]}, None, 422, "item 1 is an object"),
    ("POST", "/v1/embeddings", {"input": [[1, 2], [3]]}, None, 422, "token ids"),
    ("POST", "/v1/embeddings", {"text": "x"}, None, 422, "input: Field required"),
    ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "hex"}, None, 422,
     "encoding_format"),
    ("POST", "/v1/embeddings", {"input": "x", "dimensions": 8}, None, 422, "width 32"),
    ("POST", "/v1/embeddings", {"input": "x", "model": "gpt-4"}, None, 404, "'gpt-4' is not"),
    ("POST", "/v1/embeddings", {"input": "x", "model": 7}, None, 422, "model"),
    ("POST", "/v1/embeddings", {"input": ["x"] * 41}, None, 413, "limit is 40"),
    ("POST", "/v1/embeddings", {"input": [LONG] * 30}, None, 413, "tokens; the limit is 300"),
    ("POST", "/v1/embeddings", {"input": ["x " * 12000]}, None, 413, "over 20000 bytes"),
    ("POST", "/v1/fill-mask", {"input": "no mask here"}, None, 422, "has no <mask>"),
    ("POST", "/v1/fill-mask", {"input": "a <mask>", "top_k": 0}, None, 422, "top_k"),
    ("POST", "/v1/fill-mask", {"input": "a <mask>", "top_k": 101}, None, 422, "limit 100"),
    ("POST", "/v1/fill-mask", {"input": "a <mask>", "top_k": "3"}, None, 422, "top_k"),
    ("POST", "/v1/classify", {"input": "x"}, None, 404, "does not do classify"),
    ("POST", "/v1/embedding", {"input": "x"}, None, 404, "no endpoint POST /v1/embedding"),
    ("GET", "/", None, None, 404, "endpoints: POST /v1/embeddings"),
    ("GET", "/v1/embeddings", None, None, 405, "use POST"),
]


@pytest.mark.parametrize("method,path,body,headers,status,words", BAD,
                         ids=[f"{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_json_error(mlm, method, path, body, headers, status, words):
    raw = body if isinstance(body, bytes) else None
    r = mlm.request(method, path, None if raw is not None else body, raw=raw, headers=headers)
    assert r.status == status, r
    error = r.json["error"]
    assert words in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"]


def test_long_texts_are_cut_or_refused(mlm, clf, mlm_api):
    cut = mlm.post("/v1/embeddings", {"input": LONG})
    assert cut.status == 200 and cut.json["usage"]["prompt_tokens"] == 16
    torch.testing.assert_close(torch.tensor(cut.json["data"][0]["embedding"]),
                               mlm_api.embed([LONG])[0], atol=1e-5, rtol=1e-5)
    refused = clf.post("/v1/classify", {"input": ["a dog", LONG]})
    assert refused.status == 413
    assert "input 1 has" in refused.json["error"]["message"]
    assert "at most 16" in refused.json["error"]["message"]
    assert clf.post("/v1/classify", {"input": "a", "pair": ["b", "c"]}).status == 422
    assert clf.post("/v1/fill-mask", {"input": "a <mask>"}).status == 404


def test_server_still_serves_after_bad_input(mlm):
    assert mlm.post("/v1/embeddings", {"input": "still fine"}).status == 200


# --------------------------------------------------------------------------- CLI, shutdown
def test_cli_refuses_a_budget_below_the_model_length(models, capsys):
    assert cli_main(["serve", str(models / "mlm"), "--max-batch-tokens", "8"]) == 2
    assert "max_batch_tokens 8 is below the model's maximum length 16" in capsys.readouterr().err


def test_cli_refuses_a_port_in_use(models, mlm, capsys):
    assert cli_main(["serve", str(models / "mlm"), "--port", str(mlm.port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_answers_requests_in_flight(models, mlm_api, tmp_path, sig):
    server = ServerProcess(models / "mlm", "--max-wait-ms", "3000", "--max-queue-ms", "20000",
                           "--workers", "2",
                           log_file=tmp_path / "log")
    batch = texts(4, seed=11)
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(server.post, "/v1/embeddings", {"input": t}) for t in batch]
        _wait_for_pending(server, 4)  # all four wait in the batcher (3 s) when the signal comes
        status, out = server.stop(sig)
        results = [a.result() for a in answers]
    assert status == 0, server.log()
    assert "answering the requests in flight" in server.log() and "stopped" in out
    for text, answer in zip(batch, results, strict=True):
        assert answer.status == 200, answer
        torch.testing.assert_close(torch.tensor(answer.json["data"][0]["embedding"]),
                                   mlm_api.embed([text])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConnectionRefusedError):
        request(server.port, "GET", "/health", timeout=5)


def _wait_for_pending(server, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.request("GET", "/health").json["pending_inputs"] < n:
        assert time.monotonic() < deadline, "the requests never reached the server"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ benchmark
def _load_script():
    path = Path(__file__).parent.parent / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_load_test_script_checks_answers_then_measures(models, mlm, tmp_path):
    script = _load_script()
    texts = script.load_texts(None, 64)
    assert len(texts) == 64 and all(4 <= len(t.split()) <= 61 for t in texts)
    # Negative control: the answers of the MLM server are not the classifier's embeddings.
    with pytest.raises(RuntimeError, match="differ from Predictor.embed"):
        script.check_answers(script.Target("serve", "x", models / "clf"), mlm.port, texts)
    out = tmp_path / "out"
    assert script.main(["--serve", f"tiny={models / 'mlm'}", "--requests", "12",
                        "--clients", "1,4", "--time-limit", "30", "--threads", "1",
                        "--out", str(out), "--note", "test"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["environment"]["cpu_flags"]) >= {"avx512_bf16", "amx_bf16", "amx_tile"}
    assert results["environment"]["cpu"] in (out / "results.md").read_text()
    [target] = results["targets"]
    assert target["check"].startswith("equal to Predictor.embed")
    assert [lv["clients"] for lv in target["levels"]] == [1, 4]
    for level in target["levels"]:
        assert level["requests"] == level["texts"] == 12 and level["errors"] == 0
        assert level["texts_per_s"] > 0 and level["p50_ms"] <= level["p99_ms"]
        assert level["stopped_by"] == "count" and level["mean_batch_rows"] >= 1
        assert level["server_cpu_s"] >= 0  # 12 tiny requests may take under one clock tick
        assert level["texts_per_cpu_s"] is None or level["texts_per_cpu_s"] > 0
    before = script.cpu_seconds(os.getpid())
    end = time.process_time() + 0.1
    while time.process_time() < end:  # burn 0.1 s of CPU
        pass
    assert script.cpu_seconds(os.getpid()) - before >= 0.05
    assert results["environment"]["cpu"]
    assert "| tiny | serve | 4 |" in (out / "results.md").read_text()


# ------------------------------------------------------------------ a transformers model
def test_serves_a_transformers_masked_lm_like_the_predictor(tmp_path):
    """Any directory Predictor loads: here a (tiny, unconverted) Hugging Face BertForMaskedLM
    with its own tokenizer and mask token."""
    pytest.importorskip("transformers")
    import convertcheck

    folder = convertcheck.tiny_bert(tmp_path / "bert-mlm", task="masked-lm")
    api = Predictor.from_pretrained(folder)
    server = ServerProcess(folder, log_file=tmp_path / "log")
    try:
        batch = ["the king saw the dog", "a cat"]
        r = server.post("/v1/embeddings", {"input": batch})
        assert r.status == 200, r
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in r.json["data"]]),
                                   api.embed(batch), atol=1e-5, rtol=1e-5)
        text = "the king <mask> the [MASK]"
        r = server.post("/v1/fill-mask", {"input": text, "top_k": 3})
        assert r.status == 200, r
        want = api.fill_mask(text, top_k=3)
        [row] = r.json["data"]
        assert row["text"] == want.text and row["filled"] == want.filled
        assert [[c["token_id"] for c in m] for m in row["masks"]] == [
            [c.token_id for c in m] for m in want.candidates]
        assert server.post("/v1/classify", {"input": "x"}).status == 404
    finally:
        status, _ = server.stop()
    assert status == 0


@pytest.mark.parametrize("unbounded", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_load_test_overload_mode_reports_every_level(models, tmp_path, unbounded):
    """The overload mode end to end on the tiny model (short levels: the figures mean
    nothing here, their bookkeeping does); the slow tier adds the unbounded ablation."""
    script = _load_script()
    out = tmp_path / "over"
    assert script.main(["--serve", f"tiny={models / 'mlm'}", "--overload", "--multiples", "1,4",
                        "--duration", "1", "--capacity-seconds", "1", "--capacity-clients",
                        "2", "--texts-per-request", "2", "--threads", "1", "--out", str(out),
                        "--server-cpus", "0", *(["--compare-unbounded"] if unbounded else [])]
                       ) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["server_cpus"] == [0]
    assert results["environment"]["client_cpus"] == sorted(os.sched_getaffinity(0))
    bounded = results["runs"][0]
    assert bounded["capacity"]["requests_per_s"] > 0
    assert bounded["capacity"]["texts_per_s_after_levels"] > 0  # measured again after
    assert len(results["runs"]) == 1 + unbounded
    if unbounded:
        other = results["runs"][1]
        assert other["capacity"] is None
        assert other["base_requests_per_s"] == bounded["base_requests_per_s"]
        assert "--max-queue-tokens 100000000" in other["server_command"]
    for run in results["runs"]:
        assert [lv["multiple"] for lv in run["levels"]] == [1.0, 4.0]
        for lv in run["levels"]:
            assert lv["requests"] == (lv["answered_200"] + lv["refused_429_503"]
                                      + lv["client_timeouts"] + lv["other_failures"])
            assert lv["other_failures"] == 0 and lv["answered_200"] > 0
            assert lv["texts_computed"] >= 2 * lv["answered_200"]
            assert lv["goodput_texts_per_s"] == round(2 * lv["answered_200"] / 1, 1)
            assert lv["peak_rss_mib"] > 10
            # where the time went: the probe ran (every 10 ms), both processes used CPU
            assert lv["server_loop_lag_p99_ms"] is not None
            assert lv["server_loop_lag_p50_ms"] <= lv["server_loop_lag_p99_ms"]
            assert set(lv["server_cpu_s"]) == {"event_loop", "model", "other",
                                               "model_processes"}
            assert lv["server_cpu_s"]["event_loop"] > 0 and lv["client_cpu_s"] > 0
            assert lv["client_send_late_p99_ms"] >= 0
        assert set(run["verdicts"]) == {"4x"}
    assert "| 4x |" in (out / "results.md").read_text()
