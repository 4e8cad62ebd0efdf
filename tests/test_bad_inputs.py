"""A table of bad inputs and the one-line message each must produce (issue 13, item 6 and more).

Each case builds its bad input in a temporary folder, runs the command line in this process and
checks: exit status 2, the message (a regular expression, naming the file where there is one),
and no traceback. Cases where something was already written check that it is still there.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ultrafastbert.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CONFIG = FIXTURES / "train_model.json"
TOKENIZER = FIXTURES / "train_tokenizer.json"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MLM model directory (the tiny training config, random weights)."""
    from ultrafastbert.model import ModelConfig, UltraFastBertForMaskedLM

    config = ModelConfig.from_dict(json.loads(TINY_CONFIG.read_text()))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "M"
    UltraFastBertForMaskedLM(config).save_pretrained(out, tokenizer_file=TOKENIZER)
    return out


def _copy_model(model_dir: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp / "M"))


def _weights(tmp: Path) -> Path:
    return tmp / "M" / "model.safetensors"


# ------------------------------------------------------------------------ the bad inputs
def corrupt_middle(m: Path, tmp: Path) -> list[str]:
    """1,000 bytes overwritten in the middle of the weights (loads silently before)."""
    m = _copy_model(m, tmp)
    data = bytearray(_weights(tmp).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 1000] = b"\xff" * 1000
    _weights(tmp).write_bytes(bytes(data))
    return ["predict", "fill-mask", str(m), "the <mask> is here"]


def truncated_weights(m: Path, tmp: Path) -> list[str]:
    m = _copy_model(m, tmp)
    data = _weights(tmp).read_bytes()
    _weights(tmp).write_bytes(data[:len(data) // 2])
    return ["predict", "embed", str(m), "some text"]


def config_holding(text: str) -> Callable[[Path, Path], list[str]]:
    def case(m: Path, tmp: Path) -> list[str]:
        m = _copy_model(m, tmp)
        (m / "config.json").write_text(text)
        return ["predict", "embed", str(m), "some text"]
    return case


def config_with_typo(m: Path, tmp: Path) -> list[str]:
    m = _copy_model(m, tmp)
    config = json.loads((m / "config.json").read_text())
    config["n_layer"] = config.pop("n_layers")
    (m / "config.json").write_text(json.dumps(config))
    return ["predict", "embed", str(m), "some text"]


def pretrain_args(tmp: Path, *extra: str, corpus: Path | None = None) -> list[str]:
    return ["pretrain", "--config", str(TINY_CONFIG), "--tokenizer", str(TOKENIZER),
            "--corpus", str(corpus or FIXTURES / "train_corpus.txt"), "--seq-len", "32",
            "--max-steps", "2", "--micro-batch", "8", "--batch-size", "8", "--no-progress",
            "--cache-dir", str(tmp / "cache"), *extra]


def truncated_gz_corpus(m: Path, tmp: Path) -> list[str]:
    raw = gzip.compress((FIXTURES / "train_corpus.txt").read_bytes())
    corpus = tmp / "corpus.txt.gz"
    corpus.write_bytes(raw[:len(raw) // 2])
    return pretrain_args(tmp, "--out", str(tmp / "out"), corpus=corpus)


def pretrain_config_holding(text: str) -> Callable[[Path, Path], list[str]]:
    def case(m: Path, tmp: Path) -> list[str]:
        (tmp / "model.json").write_text(text)
        args = pretrain_args(tmp, "--out", str(tmp / "out"))
        args[args.index(str(TINY_CONFIG))] = str(tmp / "model.json")
        return args
    return case


def out_is_a_file(m: Path, tmp: Path) -> list[str]:
    (tmp / "some_file").write_text("keep me")
    return pretrain_args(tmp, "--out", str(tmp / "some_file"))


def out_unwritable(m: Path, tmp: Path) -> list[str]:
    # /sys refuses new entries even to root (chmod would not stop root).
    return pretrain_args(tmp, "--out", "/sys/ultrafastbert-test-out")


def cuda_device(m: Path, tmp: Path) -> list[str]:
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    return ["predict", "fill-mask", str(m), "the <mask> is", "--device", device]


def glue_args(m: Path, tmp: Path, *extra: str) -> list[str]:
    glue = Path(shutil.copytree(FIXTURES / "glue_mini", tmp / "glue"))
    return ["glue", "--model", str(m), "--glue-dir", str(glue), "--tasks", "RTE", "--out",
            str(tmp / "glue_out"), "--no-progress", "--max-length", "32", *extra]


def glue_latin1_tsv(m: Path, tmp: Path) -> list[str]:
    args = glue_args(m, tmp)
    dev = tmp / "glue" / "RTE" / "dev.tsv"
    lines = dev.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Paris.", "Paris caf\xe9.".encode("latin-1"))
    assert b"\xe9" in lines[2]
    dev.write_bytes(b"\n".join(lines))
    return args


def glue_max_length(m: Path, tmp: Path) -> list[str]:
    return glue_args(m, tmp, "--max-length", "512")


def glue_cuda(m: Path, tmp: Path) -> list[str]:
    return glue_args(m, tmp, "--device", "cuda:99" if torch.cuda.is_available() else "cuda")


def predict_option(*option: str) -> Callable[[Path, Path], list[str]]:
    def case(m: Path, tmp: Path) -> list[str]:
        return ["predict", "fill-mask", str(m), "the <mask> is", *option]
    return case


@dataclass(frozen=True)
class Case:
    """A bad input: how to build it (returns the command line) and the message it must give.
    ``absent``: paths (relative to the temporary folder) the failed command must not create."""

    name: str
    build: Callable[[Path, Path], list[str]]
    message: str
    absent: tuple[str, ...] = ()


CUDA = (r"only \d+ CUDA device" if torch.cuda.is_available()
        else r"--device cuda: this torch \(.*\) is built without CUDA; use --device cpu")

CASES = [
    Case("weights with 1,000 bytes overwritten", corrupt_middle,
         r"M/model\.safetensors: tensor \S+ holds \d+ non-finite values \(NaN or infinity\)"),
    Case("truncated weights", truncated_weights,
         r"M/model\.safetensors is truncated or corrupt \(SafetensorError"),
    Case("config.json holding []", config_holding("[]"),
         r"model config \S+M/config\.json holds a JSON array, not an object"),
    Case("config.json empty", config_holding(""), r"model config \S+M/config\.json is empty"),
    Case("config.json not JSON", config_holding('{"vocab_size": 1024,\n'),
         r"M/config\.json, line 2 column 1: not valid JSON"),
    Case("config.json with a typo", config_with_typo,
         r"config\.json: unknown keys 'n_layer' \(did you mean 'n_layers'\?\)"),
    Case("truncated .txt.gz corpus", truncated_gz_corpus,
         r"corpus\.txt\.gz: the compressed file is truncated or corrupt after line \d+",
         absent=("out",)),
    Case("pretrain --config holding []", pretrain_config_holding("[]"),
         r"model\.json holds a JSON array, not an object", absent=("out",)),
    Case("pretrain --config with a typo", pretrain_config_holding('{"vocab_sise": 1024}'),
         r"unknown keys 'vocab_sise' \(did you mean 'vocab_size'\?\)", absent=("out",)),
    Case("pretrain --out is a file", out_is_a_file,
         r"--out \S+some_file is a file, not a directory"),
    Case("pretrain --out unwritable", out_unwritable,
         r"cannot create the output directory /sys/ultrafastbert-test-out \(Operation not "
         r"permitted\); choose a --out you can write to"),
    Case("predict --device cuda without CUDA", cuda_device, CUDA),
    Case("predict --top-k 0", predict_option("--top-k", "0"),
         r"argument --top-k: expected a number >= 1, got 0"),
    Case("predict --batch-size 0", predict_option("--batch-size", "0"),
         r"argument --batch-size: expected a number >= 1, got 0"),
    Case("GLUE TSV with a Latin-1 byte", glue_latin1_tsv,
         r"RTE/dev\.tsv, line 3: byte 0xe9 is not UTF-8", absent=("glue_out",)),
    Case("glue --max-length 512", glue_max_length,
         r"--max-length 512 exceeds the model's max_seq_len 32", absent=("glue_out",)),
    Case("glue --device cuda without CUDA", glue_cuda, CUDA, absent=("glue_out",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_line(case: Case, model_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = case.build(model_dir, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) if "argument" in case.message else _no_exit() as exited:
        status = main(argv)
    status = exited.value.code if exited is not None else status
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err  # one line (argparse puts its usage above it)
    assert re.search(case.message, errors[0]), err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert set(before) <= set(after), "the failed command removed files"
    for path in case.absent:
        assert not (tmp_path / path).exists(), f"the failed command left {path}"


class _no_exit:
    """``with`` stand-in for ``pytest.raises(SystemExit)`` when the command returns."""

    value = None

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_some_file_out_is_untouched(tmp_path: Path) -> None:
    (tmp_path / "some_file").write_text("keep me")
    assert main(pretrain_args(tmp_path, "--out", str(tmp_path / "some_file"))) == 2
    assert (tmp_path / "some_file").read_text() == "keep me"


def test_good_inputs_still_work(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Negative control: the same commands on the intact model succeed."""
    assert main(["predict", "fill-mask", str(model_dir), "the <mask> is", "--top-k", "2"]) == 0
    assert "mask 1:" in capsys.readouterr().out


def test_kernels_on_a_missing_device_lists_none_available(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """``kernels --device cuda`` on a CPU-only torch listed ``torch`` as available (item 14)."""
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["kernels", "--device", device]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "available" in line]
    assert len(lines) >= 3 and all("unavailable: device cuda" in line for line in lines)
    assert main(["kernels", "--device", "cpu"]) == 0  # negative control
    assert re.search(r"^torch +available", capsys.readouterr().out, re.MULTILINE)
