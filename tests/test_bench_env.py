"""Every result file records the CPU it ran on: model, speed flags, cores, threads, dtypes,
torch and oneDNN versions (``bench.common.environment``)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

from ultrafastbert.bench import common
from ultrafastbert.utils import machine

ROOT = Path(__file__).resolve().parents[1]

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
physical id\t: 0
cpu cores\t: 2
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
physical id\t: 0
cpu cores\t: 2
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
"""
ZEN4 = INTEL_AMX.replace("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "AMD EPYC 9R14").replace(
    " amx_bf16 amx_tile amx_int8", "")


def test_cpu_facts_read_model_flags_and_cores():
    intel = machine.cpu_facts(INTEL_AMX)
    assert intel["cpu"].startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert intel["cpu_flags"] == {f: True for f in machine.SPEED_FLAGS}
    assert intel["cpu_cores"] == 2
    amd = machine.cpu_facts(ZEN4)  # negative control: the same text without AMX
    assert amd["cpu"] == "AMD EPYC 9R14" and amd["cpu_flags"]["avx512_bf16"] is True
    assert not any(amd["cpu_flags"][f] for f in ("amx_tile", "amx_bf16", "amx_int8"))
    unknown = machine.cpu_facts("")  # no /proc/cpuinfo: flags unknown, not absent
    assert set(unknown["cpu_flags"].values()) == {None} and unknown["cpu_cores"] is None


def test_environment_has_every_cpu_fact_and_the_dtypes():
    env = common.environment("cpu", dtypes=[torch.float32, "bfloat16"])
    for key in ("cpu", "cpu_flags", "cpu_cores", "cpu_logical", "torch_threads", "torch",
                "onednn", "dtypes"):
        assert key in env, key
    assert set(env["cpu_flags"]) == set(machine.SPEED_FLAGS)
    assert env["dtypes"] == ["float32", "bfloat16"]
    assert env["torch_threads"] == torch.get_num_threads()
    if torch.backends.mkldnn.is_available():
        assert env["onednn"] and env["onednn"][0].isdigit()
    json.dumps(env)  # result files are JSON


def test_speed_summary_names_cpu_flags_threads():
    env = {**common.environment(dtypes=["bfloat16"]), **machine.cpu_facts(INTEL_AMX)}
    line = common.speed_summary(env)
    assert line.startswith("Intel(R) Xeon(R)") and "amx_bf16" in line and "bfloat16" in line
    assert f"{env['torch_threads']} threads" in line
    amd = common.speed_summary({**env, **machine.cpu_facts(ZEN4)})
    assert "amx" not in amd and "avx512_bf16" in amd


def _writes_results(tree: ast.AST) -> bool:
    names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
             if isinstance(n, ast.Attribute | ast.Name)}
    return bool(names & {"dump", "atomic_write_json", "write_results", "write_text"})


def test_every_benchmark_script_that_writes_results_records_the_cpu_facts():
    """A result-writing script under benchmarks/ takes its environment from bench.common
    (``environment`` or ``cpu_facts``), so its files carry the CPU model and flags."""
    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        source = path.read_text()
        if _writes_results(ast.parse(source)) and not (
                "bench.common import" in source or "from ultrafastbert.bench import common"
                in source):
            missing.append(path.name)
    assert not missing, f"result files without CPU facts: {missing}"
