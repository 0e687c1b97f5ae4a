"""Imports every strategy module so that each registers itself (``registry.get_strategy`` imports this)."""

from denoiser_svc.cache import (  # noqa: F401
    blockdance,
    dbcache,
    first_block,
    magcache,
    meancache,
    pab,
    taylorseer,
    teacache,
)
