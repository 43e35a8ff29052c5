"""The bf16 check reads the CPU's flags as /proc/cpuinfo writes them on x86 and on Arm."""

import pytest

from vllm_beagle.cpu import native_bf16, warn_if_slow_bf16

# Abridged from real /proc/cpuinfo files: an AVX2-only AMD EPYC (Zen 3), a Zen 4 EPYC, a Sapphire Rapids
# Xeon (AMX), and a Graviton 3 (Arm).
ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
XEON = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize("text, expected", [(ZEN3, False), (ZEN4, True), (XEON, True), (GRAVITON3, True),
                                            (ARM_OLD, False), ("processor\t: 0\n", None)])
def test_native_bf16_reads_the_flags(tmp_path, text, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert native_bf16(str(path)) is expected


def test_unreadable_cpuinfo_is_unknown(tmp_path):
    assert native_bf16(str(tmp_path / "absent")) is None


def test_warning_names_the_command_only_where_bf16_is_slow(tmp_path, capsys):
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    slow.write_text(ZEN3)
    fast.write_text(XEON)
    assert warn_if_slow_bf16("beagle train --precision bf16", str(slow))
    err = capsys.readouterr().err
    assert "beagle train --precision bf16" in err and "float32" in err
    assert not warn_if_slow_bf16("beagle train --precision bf16", str(fast))
    assert not warn_if_slow_bf16("beagle train --precision bf16", str(tmp_path / "absent"))
    assert capsys.readouterr().err == ""
