"""What a result records of its CPU (runners/metrics.py): enough to tell apart two machines that report
the same marketing name (a VM's "AMD EPYC" was a Zen 3 with 512 KB of L2 per core one day and a Zen 4
with 1 MB the next, and the CPU decode kernel's speed differs between them by ~30 %)."""
import os
import platform
import sys

import pytest

from runners.metrics import cpu_identity, cpu_summary, env_info

X86 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC
stepping	: 1
flags		: fpu sse4_2 avx f16c fma avx2 avx512f avx512bw

processor	: 1
vendor_id	: OtherVendor
cpu family	: 6
"""

ARM = """processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes sve
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40

"""


def _sysfs(root, caches):
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return str(root)


def test_cpu_identity_reads_the_first_processor_and_its_caches(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(X86)
    sysfs = _sysfs(tmp_path / "cache", [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                        (3, "Unified", "32768K")])
    c = cpu_identity(str(info), sysfs)
    assert (c["vendor"], c["family"], c["model_number"], c["stepping"]) == ("AuthenticAMD", "25", "17", "1")
    assert c["caches"] == {"L1d": "32K", "L2": "1024K", "L3": "32768K"}  # the instruction cache left out
    assert c["flags"] == ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw"]  # in _ISA_FLAGS order


def test_cpu_identity_on_arm_and_without_sysfs(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(ARM)
    c = cpu_identity(str(info), str(tmp_path / "absent"))
    assert (c["vendor"], c["model_number"], c["stepping"], c["family"]) == ("0x41", "0xd40", "0x1", None)
    assert c["flags"] == ["asimd", "sve"] and c["caches"] == {}
    c = cpu_identity(str(tmp_path / "no-cpuinfo"), str(tmp_path / "absent"))  # e.g. macOS: nothing to read
    assert c["vendor"] is None and c["flags"] == [] and c["model"]


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists("/proc/cpuinfo")
                         and platform.machine() in ("x86_64", "aarch64")),
                    reason="the /proc/cpuinfo fields read are those of x86-64 and ARM64 Linux")
def test_this_machine_is_identified():
    c = env_info("cpu")["cpu"]
    assert c["vendor"] and c["model_number"] is not None and c["isa"]
    s = cpu_summary()
    assert s.startswith(c["model"]) and c["vendor"] in s
