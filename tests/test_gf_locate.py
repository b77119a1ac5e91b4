"""Locating the member at fault from a raid6 P/Q mismatch: the fast answer against the reference's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstore.raid import kernels, reference

FAST = settings(max_examples=200, deadline=None)


def _corrupt(k: int, n: int, seed: int, where: str | int) -> tuple[np.ndarray, np.ndarray]:
    """(pd, qd) of a random row whose member `where` ("P", "Q" or data index) took random damage."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (k, n), dtype=np.uint8)
    p, q = reference.pq_syndrome(data)
    error = rng.integers(0, 256, n, dtype=np.uint8)
    error[rng.integers(0, n)] |= 1  # never all zero
    read = data.copy()
    if where == "P":
        p = p ^ error
    elif where == "Q":
        q = q ^ error
    else:
        read[where] ^= error
    p2, q2 = reference.pq_syndrome(read)
    return p ^ p2, q ^ q2


@pytest.mark.parametrize("k", [1, 2, 3, 5, 14])
@pytest.mark.parametrize("n", [1, 7, 4096])
def test_one_member_wrong_is_found(k: int, n: int) -> None:
    for seed, where in enumerate(["P", "Q", *range(k)]):
        pd, qd = _corrupt(k, n, seed, where)
        assert reference.locate_pq_error(pd, qd, k) == where
        assert kernels.locate_pq_error(pd, qd, k) == where


def test_no_difference_and_two_members_wrong() -> None:
    zero = np.zeros(64, np.uint8)
    assert reference.locate_pq_error(zero, zero, 4) is None
    assert kernels.locate_pq_error(zero, zero, 4) is None
    pd0, qd0 = _corrupt(4, 64, 1, 0)
    pd1, qd1 = _corrupt(4, 64, 2, 2)
    pd, qd = pd0 ^ pd1, qd0 ^ qd1  # data chunks 0 and 2 both off: no single culprit
    assert reference.locate_pq_error(pd, qd, 4) is None
    assert kernels.locate_pq_error(pd, qd, 4) is None
    # A pattern pointing past the data chunks (z >= k) is not a data chunk either.
    pd, qd = _corrupt(6, 64, 3, 5)
    assert reference.locate_pq_error(pd, qd, 5) is None
    assert kernels.locate_pq_error(pd, qd, 5) is None


@FAST
@given(k=st.integers(1, 16), n=st.integers(1, 80), seed=st.integers(0, 2**32 - 1),
       shape=st.sampled_from(["random", "scaled", "sparse"]))
def test_matches_reference(k: int, n: int, seed: int, shape: str) -> None:
    rng = np.random.default_rng(seed)
    pd = rng.integers(0, 256, n, dtype=np.uint8)
    if shape == "random":
        qd = rng.integers(0, 256, n, dtype=np.uint8)
    else:
        # qd = g^z * pd, for a z that may or may not be a data index, maybe with a byte changed.
        z = int(rng.integers(0, 20))
        qd = reference.gf_mul_const(reference.gf_pow2(z), pd)
        if shape == "sparse":
            pd[rng.random(n) < 0.5] = 0
            qd = reference.gf_mul_const(reference.gf_pow2(z), pd)
            if rng.random() < 0.5:
                qd[rng.integers(0, n)] ^= np.uint8(rng.integers(1, 256))
    assert kernels.locate_pq_error(pd, qd, k) == reference.locate_pq_error(pd, qd, k)
