"""Caller buffers for vectored I/O tests: views of uneven sizes, none adjacent, some strided."""

from __future__ import annotations

import numpy as np

SENTINEL = 0x5A  # what every byte holds that a device must not touch
GAP = 64  # bytes between two views carved out of the shared buffer


class ViewSet:
    """Views of the given sizes cut from one buffer with gaps between them.

    The views listed in ``strided`` are instead every other byte of a buffer of
    their own (non-contiguous numpy slices, which no socket can take directly).
    """

    def __init__(self, sizes: list[int], strided: tuple[int, ...] = ()) -> None:
        self.sizes = list(sizes)
        self.arena = np.full(sum(sizes) + GAP * (len(sizes) + 1), SENTINEL, np.uint8)
        self.bases: list[np.ndarray] = []
        self.views: list[np.ndarray] = []
        self._used = np.zeros(len(self.arena), bool)
        pos = GAP
        for i, n in enumerate(sizes):
            if i in strided:
                base = np.full(2 * n, SENTINEL, np.uint8)
                self.bases.append(base)
                self.views.append(base[::2])
            else:
                self.views.append(self.arena[pos : pos + n])
                self._used[pos : pos + n] = True
                pos += n + GAP

    @property
    def nbytes(self) -> int:
        """The bytes the views hold together."""
        return sum(self.sizes)

    def fill(self, data: np.ndarray) -> ViewSet:
        """Put consecutive bytes of data into the views (returns self)."""
        pos = 0
        for v in self.views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)
        return self

    def joined(self) -> np.ndarray:
        """The views' bytes, concatenated."""
        return np.concatenate(self.views)

    def outside_untouched(self) -> bool:
        """True when no byte outside the views (gaps, the other half of a strided buffer) changed."""
        return bool((self.arena[~self._used] == SENTINEL).all()
                    and all((b[1::2] == SENTINEL).all() for b in self.bases))

    def clear(self) -> None:
        """Set every view byte back to the sentinel."""
        for v in self.views:
            v[:] = SENTINEL
