"""Long operations on a pool's members, below the pool that runs them.

``toolkit`` (what they share: the ``PoolView`` of a pool, ``Operation``, pacing,
``sweep``), ``join`` (opening a device that joins the pool), ``move``, ``rebuild``
(and hot spares), ``scrub``, and ``lifecycle`` (the pool's runner of them, one at
a time). They use the layout's maintenance API (``vstore.raid.base``) and never
import ``vstore.pool``: the pool hands itself in.
"""
