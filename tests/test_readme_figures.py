"""The README's headline figures equal the figures in the result files they cite.

Each row of the README's "Results at a glance" table (one row per claim) that links a folder
under ``benchmarks/results/`` must have an entry in :data:`CHECKS`, keyed by the row's first
cell. The entry reads the figures from that folder's files and formats them as the README prints
them; the row's bold figures must be exactly those, its threads cell the thread count the result
file recorded, and the CPU named once in the conditions line above the table the file's CPU. Also checked: every ``docs/design.md §N.M`` reference names a section that
exists, and no reference to the old, unshipped design file is left.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_HEADING = "## Results at a glance"


def _json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _row(rows: list[dict], **match: object) -> dict:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row matching {match}, found {len(found)}"
    return found[0]


def speedup(x: float) -> str:
    """``82.93 -> '82.9x'``, ``253.8 -> '254x'``, ``2.946 -> '2.95x'``: three significant digits."""
    digits = 2 if x < 10 else 1 if x < 100 else 0
    return f"{x:.{digits}f}x"


def percent(x: float) -> str:
    return f"{x:.1f}%"


def _ff(folder: Path, tokens: int, key: str, name: str = "bench_ff.json",
        impl: str = "native") -> tuple[dict, list[str]]:
    data = _json(folder, name)
    row = _row(data["rows"], config="1x11", implementation=impl, tokens=tokens)
    return data["environment"], [speedup(row[key])]


def _train_kernel(shape: str, tokens: int, key: str) -> Callable[[Path], tuple[dict, list[str]]]:
    """The native training kernel's ratio ``key`` (``benchmarks/train_kernels.py``)."""
    def check(folder: Path) -> tuple[dict, list[str]]:
        data = _json(folder, "train_kernels.json")
        row = _row(data["rows"], shape=shape, tokens=tokens, implementation="native")
        return data["environment"], [speedup(row[key])]
    return check


def _fast_8x128(*pairs: tuple[str, str]) -> Callable[[Path], tuple[dict, list[str]]]:
    """UltraFastBERT-1x11 on the fast path against a baseline, per (our dtype, baseline column)
    of ``benchmarks/fast_encoder_8x128.py``'s rows."""
    def check(folder: Path) -> tuple[dict, list[str]]:
        data = _json(folder, "fast_encoder_8x128.json")
        figures = [speedup(_row(data["rows"], model=f"ultrafastbert-1x11 fast {dtype}")[column])
                   for dtype, column in pairs]
        return data["environment"], figures
    return check


def _model(model: str, dtype: str = "float32") -> Callable[[Path], tuple[dict, list[str]]]:
    def check(folder: Path) -> tuple[dict, list[str]]:
        data = _json(folder, "bench_model.json")
        row = _row(data["rows"], model=model, dtype=dtype, batch=8)
        return data["environment"], [speedup(row["fff_model_speedup"])]
    return check


def _ff_dtype(impl: str, tokens: int, key: str) -> Callable[[Path], tuple[dict, list[str]]]:
    """A 1x11 row of a multi-dtype ``bench ff`` result (``--dtypes float32,bfloat16``)."""
    return lambda folder: _ff(folder, tokens, key, impl=impl)


def _ff_fp32_vs_any(folder: Path) -> tuple[dict, list[str]]:
    env, same = _ff_dtype("native", 128, "speedup_vs_fastest_dense")(folder)
    _, anyd = _ff_dtype("native", 128, "speedup_vs_fastest_dense_any_dtype")(folder)
    return env, same + anyd


def _texts(workload: str, embedders: tuple[str, ...], keys: tuple[str, ...]
           ) -> Callable[[Path], tuple[dict, list[str]]]:
    """Ratios of ``bench model --texts`` rows (``bench_texts.json``): each embedder's figure
    under each key, embedder-major."""
    def check(folder: Path) -> tuple[dict, list[str]]:
        data = _json(folder, "bench_texts.json")
        rows = [_row(data["rows"], workload=workload, embedder=e) for e in embedders]
        return data["environment"], [speedup(r[k]) for r in rows for k in keys]
    return check


def _overload(folder: Path) -> tuple[dict, list[str]]:
    """Goodput at 4x and 8x the measured capacity as a share of it, with the admission bounds
    and without them (``serve_load.py --overload --compare-unbounded``)."""
    data = _json(folder, "results.json")
    capacity = data["runs"][0]["capacity"]["texts_per_s"]
    share = [percent(100 * lv["goodput_texts_per_s"] / capacity)
             for run in data["runs"] for lv in run["levels"] if lv["multiple"] in (4.0, 8.0)]
    env = data["environment"]
    return {"cpu": env["cpu"], "torch_threads": env["server_threads"]}, share


def _table1(folder: Path) -> tuple[dict, list[str]]:
    data = _json(folder, "results.json")
    pct = [m["percent_of_dense_without_cola"] for name, m in data["models"].items()
           if name != "tiny-dense"]
    env = {"cpu": "AMD EPYC", "torch_threads": data["environment"]["torch_threads"]}
    return env, [percent(min(pct)), percent(max(pct))]


def _serve_once(folder: Path) -> tuple[dict, list[str]]:
    data = json.loads((folder / "results.json").read_text())
    rate = {t["label"]: next(lv["texts_per_s"] for lv in t["levels"] if lv["clients"] == 64)
            for t in data["targets"]}
    env = data["environment"]
    return ({"cpu": env["cpu"], "torch_threads": env["server_threads"]},
            [speedup(rate["minilm-fff-8x7"] / rate["minilm-dense"])])


def _serve(folder: Path) -> tuple[dict, list[str]]:
    figures: list[str] = []
    for run in (folder, folder / "repeat_64_clients"):
        env, figure = _serve_once(run)
        figures += figure
    return env, figures


def _convert(model: str, keys: tuple[str, ...]) -> Callable[[Path], tuple[dict, list[str]]]:
    """Figures of one converted model in ``benchmarks/convert_minilm.py``'s results."""
    def check(folder: Path) -> tuple[dict, list[str]]:
        data = _json(folder, "results.json")
        row = _row(data["rows"], model=model)
        shown = {"stsb": lambda v: f"{v:.1f}", "gain_kept_pct": percent,
                 "raw_pct": percent, "encoder_speedup": speedup, "ffn_speedup": speedup,
                 "sst2_pct_of_dense": percent, "mrpc_pct_of_dense": percent}
        return data["environment"], [shown[k](row[k]) for k in keys]
    return check


def _ff_tokens(*tokens: int) -> Callable[[Path], tuple[dict, list[str]]]:
    """The fp32 native 1x11 layer against the fastest fp32 dense at each of ``tokens``."""
    def check(folder: Path) -> tuple[dict, list[str]]:
        figures: list[str] = []
        for n in tokens:
            env, figure = _ff(folder, n, "speedup_vs_fastest_dense")
            figures += figure
        return env, figures
    return check


def _models(*names: str, dtype: str = "float32") -> Callable[[Path], tuple[dict, list[str]]]:
    """UltraFastBERT-1x11's whole-encoder speedup over each of ``names`` at batch 8."""
    def check(folder: Path) -> tuple[dict, list[str]]:
        figures: list[str] = []
        for name in names:
            env, figure = _model(name, dtype)(folder)
            figures += figure
        return env, figures
    return check


def _kernels(name: str, dtype: str, *cells: tuple[str, int]
             ) -> Callable[[Path], tuple[dict, list[str]]]:
    """The native kernel's speedup over the fastest dense FFN per (config, tokens) cell of a
    ``benchmarks/kernel_bench.py`` result (``name``, rows of ``dtype``)."""
    def check(folder: Path) -> tuple[dict, list[str]]:
        data = _json(folder, name)
        return data["env"], [speedup(_row(data["rows"], config=c, tokens=t, dtype=dtype)
                                     ["native_speedup"]) for c, t in cells]
    return check


#: README row (first cell) -> reader of (environment, figures as printed) from the row's folder.
CHECKS: dict[str, Callable[[Path], tuple[dict, list[str]]]] = {
    "all-MiniLM-L6-v2 converted to FFF 8x7 (4.2% of FFN neurons per token; 60 min on one core, "
    "GLUE-train text without STS-B): STS-B dev; FFN gain kept over the FFN-removed ablation; "
    "SST-2 / MRPC as % of dense":
        _convert("minilm-8x7-60m", ("stsb", "gain_kept_pct", "sst2_pct_of_dense",
                                    "mrpc_pct_of_dense")),
    "same, whole encoder 32x128 vs dense all-MiniLM-L6-v2 in PyTorch fp32":
        _convert("minilm-8x7-60m", ("encoder_speedup",)),
    "best 60-minute 8x7 on general text: whole GLUE-train sentences (`glue_text_corpus.py "
    "--longest-phrases`), `--cos-weight 100`; the same text's two other runs 85.5 / 85.2: STS-B dev; "
    "FFN gain kept; SST-2 / MRPC as % of dense":
        _convert("sent-cw100-8x7-60m", ("stsb", "gain_kept_pct", "sst2_pct_of_dense",
                                        "mrpc_pct_of_dense")),
    "same conversion with STS-B's train sentences in the unlabeled text: STS-B dev; FFN gain kept":
        _convert("minilm-8x7-60m-stsbtext", ("stsb", "gain_kept_pct")),
    "converted MiniLM 8x7 embedding STS-B dev sentences (batches of 32, tokenization included, "
    "packed tokens, native attention, int8 projections and FFF weights) vs dense MiniLM on ONNX "
    "Runtime int8 (per-channel dynamic); vs dense PyTorch fp32":
        _texts("stsb-dev-batches-of-32", ("ours FFF int8",), ("vs_ort_int8", "vs_dense_torch_fp32")),
    "same model, 32 texts of 128 tokens, vs dense MiniLM on ONNX Runtime int8; ours in fp32, "
    "bf16, int8":
        _texts("32x128", ("ours FFF float32", "ours FFF bfloat16", "ours FFF int8"),
               ("vs_ort_int8",)),
    "serving the converted 8x7 vs dense MiniLM in the same server, texts/s at 64 clients":
        _serve_once,
    "serving the converted 8x7 under overload (16 sentences a request, 2 s client timeouts): "
    "goodput at 4x / 8x the measured capacity, as a share of it; the same with the admission "
    "bounds lifted": _overload,
    "FFF 1x11 layer vs the fastest fp32 dense-4095 (oneDNN, prepacked weights), 1 / 128 / 4,096 "
    "tokens": _ff_tokens(1, 128, 4096),
    "FFF 8x7 / 32x5 layer at d=384 (all-MiniLM-L6-v2's FFN shape) vs the fastest fp32 dense "
    "FFN (384 -> 1536 -> 384), 128 / 4,096 tokens":
        _kernels("d384_t2.json", "float32", ("8x7", 128), ("8x7", 4096), ("32x5", 128),
                 ("32x5", 4096)),
    "FFF 1x11 layer in bf16 vs the fastest bf16 dense-4095, 4,096 tokens":
        _ff_dtype("native-bf16", 4096, "speedup_vs_fastest_dense"),
    "FFF 1x11 training (fwd+bwd, the native training kernel) vs the original masked form, 4,096 "
    "tokens": _train_kernel("1x11", 4096, "vs_masked"),
    "whole encoder 8x128, UltraFastBERT-1x11 vs `BertModel` on the same prepacked oneDNN GEMMs; "
    "vs `BertModel` as shipped; vs crammedBERT-4095":
        _models("hf-bert-base-onednn", "hf-bert-base", "crammedbert-4095"),
    "same in bf16, vs `BertModel` in bf16": _models("hf-bert-base", dtype="bfloat16"),
    "whole encoder 8x128 on the fast path (fused QKV, native attention, prepacked projections), "
    "UltraFastBERT-1x11 vs `BertModel` as shipped: fp32 vs fp32; bf16 vs bf16; int8 vs bf16":
        _fast_8x128(("float32", "vs hf-bert-base float32"), ("bfloat16", "vs hf-bert-base bfloat16"),
                    ("int8", "vs hf-bert-base bfloat16")),
    "small-scale Table 1: GLUE average (w/o CoLA) of FFF models as % of the equal-width dense "
    "model": _table1,
}


@dataclass(frozen=True)
class Row:
    what: str
    figure: str
    threads: str
    folder: Path | None


def results_section(text: str) -> str:
    return text.split(RESULTS_HEADING, 1)[1].split("\n## ", 1)[0]


def conditions_cpu(text: str) -> str:
    """The CPU the conditions line above the table names (every row's CPU)."""
    found = re.search(r"Conditions for every row: (.+?) \(", results_section(text))
    assert found, "the results section states no conditions line ('Conditions for every row:')"
    return found.group(1)


def results_rows(text: str) -> list[Row]:
    """The rows of the README's results table (header and separator left out)."""
    lines = [ln for ln in results_section(text).splitlines() if ln.startswith("|")][2:]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, f"a results row needs 4 cells (claim, figure, threads, folder): {line}"
        link = re.search(r"\]\((benchmarks/results/[^)]+)\)", cells[3])
        rows.append(Row(cells[0], cells[1], cells[2], ROOT / link.group(1) if link else None))
    return rows


def bold_figures(cell: str) -> list[str]:
    return re.findall(r"\*\*([^*]+)\*\*", cell)


def problems(text: str) -> list[str]:
    """Every disagreement between the README's results table and its result files."""
    out = []
    rows = results_rows(text)
    cpu = conditions_cpu(text)
    whats = [r.what for r in rows]
    out += [f"{w!r}: two rows for one claim" for w in sorted({w for w in whats
                                                              if whats.count(w) > 1})]
    for row in rows:
        if row.folder is None:
            if re.search(r"\d", row.figure):
                out.append(f"{row.what!r}: a figure without a result folder")
            continue
        if row.what not in CHECKS:
            out.append(f"{row.what!r}: no entry in CHECKS for a row that links {row.folder}")
            continue
        env, want = CHECKS[row.what](row.folder)
        if bold_figures(row.figure) != want:
            out.append(f"{row.what!r}: README says {bold_figures(row.figure)}, results say {want}")
        if env["cpu"] != cpu:
            out.append(f"{row.what!r}: measured on {env['cpu']!r}, the conditions say {cpu!r}")
        if row.threads.split()[0] != str(env["torch_threads"]):
            out.append(f"{row.what!r}: threads cell {row.threads!r}, result recorded "
                       f"{env['torch_threads']}")
    missing = set(CHECKS) - {r.what for r in rows}
    out += [f"CHECKS entry {m!r} has no README row" for m in sorted(missing)]
    return out


def test_every_headline_figure_equals_its_result_file() -> None:
    text = README.read_text()
    assert len([r for r in results_rows(text) if r.folder]) >= 8
    assert problems(text) == []


@pytest.mark.parametrize("old, new", [
    ("**85.0** (dense 86.7", "**85.1** (dense 86.7"),     # a figure that differs from its file
    ("| **1.69x** | 2 |", "| **1.69x** | 1 |"),           # a thread count the file does not hold
    ("Conditions for every row: AMD EPYC (", "Conditions for every row: Intel Xeon ("),
    ("| GPU (Triton) figures | not yet measured |", "| GPU (Triton) figures | 4.1x |"),
    ("| **1.69x** | 2 | [bench_model_8x128_fp32_bf16](benchmarks/results/bench_model_8x128_fp32_bf16/)",
     "| **1.69x** | 2 | [bench_ff_1x11_fp32_bf16](benchmarks/results/bench_ff_1x11_fp32_bf16/)"),
])
def test_a_wrong_readme_figure_is_caught(old: str, new: str) -> None:
    text = README.read_text()
    assert old in text
    with pytest.raises((AssertionError, KeyError, FileNotFoundError)):
        assert problems(text.replace(old, new, 1)) == []


def test_an_uncovered_row_is_caught() -> None:
    text = README.read_text()
    extra = ("| a new figure | **3x** | 1 | [table1](benchmarks/results/table1/) |\n"
             "| GPU (Triton) figures")
    assert any("no entry in CHECKS" in p
               for p in problems(text.replace("| GPU (Triton) figures", extra, 1)))


def test_a_second_row_for_one_claim_is_caught() -> None:
    text = README.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| FFF 1x11 training"))
    assert any("two rows for one claim" in p
               for p in problems(text.replace(row, row + "\n" + row, 1)))


def test_figure_formatting() -> None:
    assert [speedup(x) for x in (82.926, 253.77, 104.29, 2.946, 2.0955, 1.852)] == [
        "82.9x", "254x", "104x", "2.95x", "2.10x", "1.85x"]


def _tracked_text_files() -> list[Path]:
    skip = {".venv", ".git", "build", "dist", "runs", "results"}
    return [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".cpp", ".h", ".sh"}
            and not (set(p.relative_to(ROOT).parts) & skip)
            and not any(part.endswith(".egg-info") for part in p.parts)]


def test_design_references_point_to_existing_sections() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design, flags=re.M))
    assert {"1", "1.1", "1.2", "1.3", "1.4", "2", "3"} <= sections
    stale = "DESIGN " + "§"
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        assert stale not in text, f"{path}: a reference to a design file the repository lacks"
        for ref in re.findall(r"design\.md[^§\n]{0,3}§(\d+(?:\.\d+)?)", text):
            assert ref in sections, f"{path}: design.md §{ref} does not exist"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lowercase, punctuation dropped, - for spaces)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links in ``text`` (the content of ``page``) to a missing file or heading."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.name}: link to missing {target}")
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            if anchor not in {github_anchor(h) for h in headings}:
                broken.append(f"{page.name}: no heading for #{anchor} in {dest.name}")
    return broken


def test_readme_and_docs_links_resolve() -> None:
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        assert broken_links(page, page.read_text()) == []


def test_a_broken_link_is_caught() -> None:
    text = "[a](docs/fff.md#no-such-heading) [b](docs/missing.md) [c](docs/fff.md)"
    assert len(broken_links(README, text)) == 2
