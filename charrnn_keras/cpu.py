"""What this CPU multiplies fast, from the flags in /proc/cpuinfo: the choices ``auto`` makes."""

from __future__ import annotations

from pathlib import Path


def flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags.

    Args:
        cpuinfo: the text of /proc/cpuinfo (read when None; no such file, or no flags line as
            on other operating systems, gives no flags).

    Returns:
        The flags of the first processor listed, e.g. ``{"avx2", "avx512f", ...}``.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX).

    Elsewhere bf16 matmuls are emulated and slower than float32, so ``auto`` keeps float32.

    Args:
        cpuinfo: the text of /proc/cpuinfo (read when None).
    """
    return bool({"avx512_bf16", "amx_bf16"} & flags(cpuinfo))


def avx2_only(cpuinfo: str | None = None) -> bool:
    """Whether this is an x86 CPU with AVX2 and without AVX-512, where oneDNN's float32 matmul
    runs a 1-row product 2.5x faster than a 2-6-row one (BENCHMARKS.md, 3).

    Args:
        cpuinfo: the text of /proc/cpuinfo (read when None).
    """
    found = flags(cpuinfo)
    return "avx2" in found and "avx512f" not in found
