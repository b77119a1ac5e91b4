"""RAID kernels (placeholder: the numpy references until the numba kernels land)."""

from vstore.raid.reference import (  # noqa: F401
    pq_syndrome,
    recover_data2,
    recover_data_p,
    recover_data_q,
    rmw_p,
    rmw_pq,
    xor_parity,
)
