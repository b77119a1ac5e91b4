"""Human sizes: parse '64K', '1G', '512' and format bytes back."""

from __future__ import annotations

import re

from vstore.errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# Offsets are signed 64-bit in every syscall and protocol vstore speaks.
MAX_SIZE = (1 << 63) - 1
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a size such as '64K', '1.5G', '4096' (binary units) into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        if text > MAX_SIZE:
            raise ConfigError(f"size {text} is larger than the largest a device can have (8 EiB)")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (examples: 4096, 64K, 1G)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise ConfigError(f"size is not a whole number of bytes: {text!r}")
    if value > MAX_SIZE:
        raise ConfigError(f"size {text!r} is larger than the largest a device can have (8 EiB)")
    return int(value)


def format_size(n: int) -> str:
    """Format bytes as a short binary size such as '64K' or '1.5G'."""
    for unit in ("P", "T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
