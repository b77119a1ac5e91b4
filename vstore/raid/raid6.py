"""raid6: md left-symmetric rotation of P then Q, GF(2^8) with polynomial 0x11d, g = {02}.

Row ``r`` of ``n`` members: P on member ``p = n - 1 - (r mod n)``, Q on
``(p + 1) mod n``, data chunk ``j`` (``j = 0..n-3``) on ``(p + 2 + j) mod n``;
logical chunk ``c`` is data chunk ``c mod (n-2)`` of row ``c // (n-2)``.
``P = D0 ^ ... ^ D(n-3)``, ``Q = g^0*D0 ^ g^1*D1 ^ ...`` as Linux md and ISA-L.
See ``vstore.raid.geometry`` and ``ParityLayout``.
"""

from __future__ import annotations

import numpy as np

from vstore.raid import kernels
from vstore.raid.base import ParityLayout, run_kernel


class Raid6Layout(ParityLayout):
    """raid6 over n >= 4 members; survives any two failed members."""

    level = "raid6"
    nparity = 2

    async def compute_parity(self, data: np.ndarray) -> list[np.ndarray]:
        """[P, Q] of a (k, span) data array."""
        p, q = await run_kernel(data.nbytes, kernels.pq_syndrome, data)
        return [p, q]

    def parity_now(self, data: np.ndarray) -> list[np.ndarray]:
        """[P, Q] of a (k, span) data array, on the calling thread."""
        return list(kernels.pq_syndrome(data))

    def update_parity(
        self, parity: list[np.ndarray], old: np.ndarray, new: np.ndarray, j: int
    ) -> None:
        """P and Q updated in place for data chunk j changing from old to new."""
        kernels.rmw_pq(parity[0], parity[1], old, new, j)

    def recover(self, data: np.ndarray, parity: list[np.ndarray | None], missing: list[int]) -> None:
        """Rebuild up to two missing data rows in place from the rest and the live parity."""
        p, q = parity
        if len(missing) == 2:
            kernels.recover_data2(data, p, q, missing[0], missing[1])
        elif p is not None:
            kernels.recover_data_q(data, p, missing[0])
        else:
            kernels.recover_data_p(data, q, missing[0])
