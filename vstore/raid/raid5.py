"""raid5: md left-symmetric rotation of one XOR parity chunk per row.

Row ``r`` of ``n`` members: P on member ``p = n - 1 - (r mod n)``, data chunk
``j`` (``j = 0..n-2``) on member ``(p + 1 + j) mod n``; logical chunk ``c`` is
data chunk ``c mod (n-1)`` of row ``c // (n-1)``. ``P = D0 ^ D1 ^ ... ^ D(n-2)``.
See ``vstore.raid.geometry`` for the functions and ``ParityLayout`` for the
read-modify-write / reconstruct-write machinery.
"""

from __future__ import annotations

import numpy as np

from vstore.raid import kernels
from vstore.raid.base import ParityLayout, run_kernel


class Raid5Layout(ParityLayout):
    """raid5 over n >= 3 members; survives one failed member."""

    level = "raid5"
    nparity = 1

    async def compute_parity(self, data: np.ndarray) -> list[np.ndarray]:
        """[P] of a (k, span) data array."""
        return [await run_kernel(data.nbytes, kernels.xor_parity, data)]

    def parity_now(self, data: np.ndarray) -> list[np.ndarray]:
        """[P] of a (k, span) data array, on the calling thread."""
        return [kernels.xor_parity(data)]

    def update_parity(
        self, parity: list[np.ndarray], old: np.ndarray, new: np.ndarray, j: int
    ) -> None:
        """P ^= old ^ new in place, for data chunk j changing from old to new."""
        kernels.rmw_p(parity[0], old, new)

    def recover(self, data: np.ndarray, parity: list[np.ndarray | None], missing: list[int]) -> None:
        """Rebuild the one missing data row in place from the others and P."""
        (x,) = missing
        kernels.recover_data_q(data, parity[0], x)


class ConvertedRaid5Layout(Raid5Layout):
    """A raid5 of two members: a two-member raid1's bytes, the old geometry of a raid1 -> raid5 conversion."""

    transient = True
