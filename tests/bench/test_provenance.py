"""Every result JSON records what produced it, on what CPU, and when (bench.results)."""
from __future__ import annotations

import json

import torch

import edgetrain
from edgetrain.bench.results import cpu_identity, git_commit, write_json_and_markdown

X86 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 9R14
flags		: fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni
processor	: 1
model name	: AMD EPYC 9R14
"""
AARCH64 = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm sve
CPU implementer	: 0x41
CPU part	: 0xd40
"""


def test_cpu_identity_reads_x86_and_aarch64_texts():
    x86 = cpu_identity(X86)
    assert x86["cpu_model"] == "AMD EPYC 9R14"
    assert x86["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    arm = cpu_identity(AARCH64)
    assert arm["cpu_model"] == "0xd40" and arm["cpu_flags"] == ["asimd", "bf16", "i8mm", "sve"]
    assert cpu_identity("")["cpu_flags"] == []


def test_a_result_json_carries_its_provenance(tmp_path):
    res = write_json_and_markdown({"rows": [1]}, tmp_path, "x", lambda r: "# x\n")
    saved = json.loads((tmp_path / "x.json").read_text())
    p = saved["provenance"]
    assert saved["rows"] == [1] and p == res["provenance"]
    assert p["edgetrain_version"] == edgetrain.__version__ == "0.2.0"
    assert p["torch_version"] == torch.__version__ and p["torch_threads"] == torch.get_num_threads()
    assert p["cpu_model"] and isinstance(p["cpu_flags"], list) and p["command"]
    assert p["git_commit"] == git_commit()  # this checkout's commit (None for an install)
    assert p["written_at"].endswith("+00:00")


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) is None
