"""Byte units and sizes for people. Imports nothing from nbkit (every other module may import it)."""

from __future__ import annotations

GiB = 2**30
MiB = 2**20


def format_bytes(n: float, digits: int = 1) -> str:
    """A number of bytes for people: '416 B', '3.1 KB', '3.4 MB', '2.1 GB' (decimal units; `digits` decimals
    from KB up: the disk-space messages use 2, so that 'needed' and 'free' differ where they do)."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    return f"{n:.{digits}f} GB"
