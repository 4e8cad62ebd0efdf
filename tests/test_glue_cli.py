"""``ultrafastbert glue`` end to end on a tiny model and generated GLUE-layout data:
results.json structure, medians and averages, results.md, reloadable models, bad inputs."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from modelcheck import GLUE_TINY as TINY
from ultrafastbert.cli.glue import main
from ultrafastbert.data import demo_tokenizer, save_tokenizer
from ultrafastbert.glue import TASKS, encode_split, load_task, predict
from ultrafastbert.glue.metrics import compute_metrics
from ultrafastbert.model import (
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
    from_pretrained,
)

WORDS = ["the", "a", "man", "woman", "dog", "cat", "runs", "sleeps", "eats", "reads", "big",
         "small", "red", "blue", "house", "park"]
N_TRAIN, N_DEV = 32, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy machine)."""
    torch.set_num_threads(1)


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "."


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def make_glue_dir(root: Path) -> Path:
    """RTE, STS-B and CoLA (headerless) in the GLUE layout, random text."""
    rng = random.Random(0)
    for split, n in (("train", N_TRAIN), ("dev", N_DEV)):
        labels = ["entailment", "not_entailment"]
        _write(root / "RTE" / f"{split}.tsv", [["index", "sentence1", "sentence2", "label"]] + [
            [str(i), _sentence(rng), _sentence(rng), labels[i % 2]] for i in range(n)])
        head = ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                "sentence1", "sentence2", "score"]
        _write(root / "STS-B" / f"{split}.tsv", [head] + [
            [str(i), "g", "f", "2012", "0", "none", "none", _sentence(rng), _sentence(rng),
             f"{rng.uniform(0, 5):.3f}"] for i in range(n)])
        _write(root / "CoLA" / f"{split}.tsv", [
            ["src", str(i % 2), "" if i % 2 else "*", _sentence(rng)] for i in range(n)])
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glue_cli")
    tokenizer = save_tokenizer(demo_tokenizer(), root / "tok" / "tokenizer.json")
    torch.manual_seed(0)
    UltraFastBertForMaskedLM(TINY).save_pretrained(root / "model", tokenizer_file=tokenizer)
    return {"root": root, "model": root / "model", "glue": make_glue_dir(root / "glue")}


@pytest.fixture(scope="module")
def finished(setup) -> dict:
    torch.set_num_threads(1)
    out = setup["root"] / "out"
    rc = main(["--model", str(setup["model"]), "--glue-dir", str(setup["glue"]), "--tasks",
               "STS-B,rte,CoLA", "--epochs", "1", "--seeds", "3", "--out", str(out),
               "--no-progress", "--name", "tiny-1x4"])
    assert rc == 0
    return {"out": out, "results": json.loads((out / "results.json").read_text())}


def test_results_json_has_every_task_seed_and_metric(finished):
    r = finished["results"]
    assert r["complete"] and r["command"] == "glue" and r["format"] == 1
    assert r["task_names"] == ["STS-B", "RTE", "CoLA"] and list(r["tasks"]) == r["task_names"]
    assert r["protocol"]["epochs"] == 1 and r["protocol"]["seeds"] == [0, 1, 2]
    assert r["protocol"]["lr"] == 4e-5 and r["protocol"]["batch_size"] == 16
    assert r["environment"]["cpu"] and "amx_bf16" in r["environment"]["cpu_flags"]
    assert r["model"]["name"] == "tiny-1x4"
    assert (r["model"]["neurons"], r["model"]["active_neurons"]) == (31, 5)
    for name, task in r["tasks"].items():
        assert [s["seed"] for s in task["seeds"]] == [0, 1, 2]
        assert task["n_train"] == N_TRAIN and task["n_eval"] == {"dev": N_DEV}
        for run in task["seeds"]:
            assert set(run["metrics"]["dev"]) == set(TASKS[name].metrics)
            assert run["steps"] == 2  # 1 epoch of 32 examples in batches of 16
            split, metric = TASKS[name].headline
            assert run["score"] == pytest.approx(100 * run["metrics"][split][metric])


def test_medians_and_averages_are_computed_right(finished):
    tasks = finished["results"]["tasks"]
    for task in tasks.values():
        assert task["score"] == pytest.approx(statistics.median(s["score"] for s in
                                                                task["seeds"]))
        for metric, value in task["median"]["dev"].items():
            runs = [s["metrics"]["dev"][metric] for s in task["seeds"]]
            assert value == pytest.approx(statistics.median(runs))
    avg = finished["results"]["average"]
    assert avg["without_cola"] == pytest.approx((tasks["RTE"]["score"]
                                                 + tasks["STS-B"]["score"]) / 2)
    assert avg["with_cola"] == pytest.approx((tasks["RTE"]["score"] + tasks["STS-B"]["score"]
                                              + tasks["CoLA"]["score"]) / 3)
    assert tasks["RTE"]["baseline"] == pytest.approx(50.0)  # balanced labels: majority 50%
    assert tasks["STS-B"]["baseline_detail"]["kind"] == "mean"


def test_results_markdown_is_laid_out_like_table_1(finished):
    text = (finished["out"] / "results.md").read_text()
    assert ("| Model | N_T | N_I/N_T | RTE | STS-B | Avg | CoLA | Avg (w/ CoLA) |"
            in text)
    rows = [line for line in text.splitlines() if line.startswith("| tiny-1x4 |")]
    assert len(rows) == 1 and "| 31 | 16.1% |" in rows[0]
    assert "| majority / mean baseline |" in text and "median over 3 seed(s)" in text


def test_fine_tuned_models_reload_and_reproduce_their_scores(finished, setup):
    results, out = finished["results"], finished["out"]
    for name in ("RTE", "STS-B"):
        task = results["tasks"][name]
        kept = [s for s in task["seeds"] if s["model_dir"]]
        assert len(kept) == 1 and kept[0]["model_dir"] == task["model_dir"]  # the median seed
        assert sorted(p.name for p in (out / "models" / name).iterdir()) == [
            Path(task["model_dir"]).name]
        model = from_pretrained(out / task["model_dir"])
        assert isinstance(model, UltraFastBertForSequenceClassification)
        assert model.config.pooler == "first" and model.config.num_labels == TASKS[name].num_labels
        data = load_task(setup["glue"], TASKS[name])
        enc = encode_split(data.evals["dev"], demo_tokenizer(), 128)
        metrics = compute_metrics(TASKS[name], predict(model, enc), enc.labels.numpy())
        for metric, value in metrics.items():
            assert value == pytest.approx(kept[0]["metrics"]["dev"][metric], abs=1e-6)


def test_fine_tuned_model_works_with_the_predictor(finished):
    from ultrafastbert.infer import Predictor

    rte = finished["out"] / finished["results"]["tasks"]["RTE"]["model_dir"]
    result = Predictor.from_pretrained(rte).classify(["a man runs."], ["a man sleeps."])[0]
    assert result.label in ("entailment", "not_entailment")
    assert sum(result.probabilities.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------------- bad inputs
def _run(setup, tmp_path, *extra: str, model: Path | None = None) -> int:
    return main(["--model", str(model or setup["model"]), "--glue-dir", str(setup["glue"]),
                 "--out", str(tmp_path / "out"), "--epochs", "1", "--seeds", "1",
                 "--no-progress", *extra])


def test_unknown_task(setup, tmp_path, capsys):
    assert _run(setup, tmp_path, "--tasks", "RTE,SQuAD") == 2
    assert "unknown GLUE task 'SQuAD'" in capsys.readouterr().err


def test_task_not_in_the_folder(setup, tmp_path, capsys):
    assert _run(setup, tmp_path, "--tasks", "MRPC") == 2
    err = capsys.readouterr().err
    assert "task MRPC is not in the GLUE folder" in err and "CoLA, STS-B, RTE" in err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_missing_task_file(setup, tmp_path, capsys):
    glue = make_glue_dir(tmp_path / "glue")
    (glue / "RTE" / "train.tsv").unlink()
    rc = main(["--model", str(setup["model"]), "--glue-dir", str(glue), "--tasks", "RTE",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "RTE/train.tsv is missing" in capsys.readouterr().err


def test_model_without_tokenizer(setup, tmp_path, capsys):
    bare = tmp_path / "bare"
    UltraFastBertForMaskedLM(TINY).save_pretrained(bare)
    assert _run(setup, tmp_path, "--tasks", "RTE", model=bare) == 2
    err = capsys.readouterr().err
    assert f"{bare} has no tokenizer.json" in err and "copy the tokenizer" in err


def test_not_a_model_directory(setup, tmp_path, capsys):
    assert _run(setup, tmp_path, "--tasks", "RTE", model=tmp_path) == 2
    assert "no config.json" in capsys.readouterr().err


def test_output_directory_in_use(setup, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    assert _run(setup, tmp_path, "--tasks", "RTE", "--max-train-examples", "4") == 2
    assert "already holds GLUE results" in capsys.readouterr().err


def test_default_tasks_are_the_complete_ones(setup, tmp_path, caplog):
    from ultrafastbert.glue import GlueRunSettings
    from ultrafastbert.glue.run import resolve_tasks

    glue = make_glue_dir(tmp_path / "glue")
    (glue / "QNLI").mkdir()
    (glue / "QNLI" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n")
    settings = GlueRunSettings(setup["model"], glue, tmp_path / "out")
    assert [t.name for t in resolve_tasks(settings)] == ["CoLA", "STS-B", "RTE"]
    assert "skipping QNLI" in caplog.text and "train.tsv" in caplog.text
