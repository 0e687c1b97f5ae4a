"""FlexCache: per-request feature caching of the denoiser's transformer.

A request carries a ``CachePolicy`` (``chitu.v1.CachePolicy``: one config message per strategy); none means full
compute. Strategies register in ``registry`` and are applied by hooks (``hooks``) that the model does not know
about; the architecture facts come from the family adapter's ``cache_spec``. ``FlexCache`` (``session``) keeps one
session per request (state per CFG branch), released in ``finally`` on every path. Value-dependent decisions are
reduced over the group (``reduce``) so every rank and CFG branch decides alike. See docs/architecture.md.
"""

from denoiser_svc.cache.policy import (
    CachePolicy,
    policy_from_dict,
    policy_from_proto,
    policy_to_proto,
    usable_strategies,
    validate_for_model,
)
from denoiser_svc.cache.reduce import LOCAL_REDUCER, GroupReducer, LocalReducer, MetricReducer
from denoiser_svc.cache.registry import StrategyName, get_strategy, strategy_names
from denoiser_svc.cache.session import CacheSession, CacheSummary, FlexCache

__all__ = [
    "LOCAL_REDUCER", "CachePolicy", "CacheSession", "CacheSummary", "FlexCache", "GroupReducer", "LocalReducer",
    "MetricReducer", "StrategyName", "get_strategy", "policy_from_dict", "policy_from_proto", "policy_to_proto",
    "strategy_names", "usable_strategies", "validate_for_model",
]
