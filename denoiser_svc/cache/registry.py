"""The strategy registry: names, config dataclasses with their ranges, and the decorator strategies register with.

Every config is a frozen dataclass whose fields carry a default, a docstring and an allowed range (field
metadata); ``validate`` checks them all and raises ``InvalidArgument`` naming the field (``cache.<strategy>.<field>``)
and the allowed values. The proto mirrors each config message field by field (``chitu.v1.<Name>Config``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from services.errors import InvalidArgument

if TYPE_CHECKING:
    from denoiser_svc.cache.strategy import Strategy


class StrategyName(enum.StrEnum):
    """FlexCache strategies; the values are the ``CachePolicy.strategy`` oneof field names."""

    TEACACHE = "teacache"
    FIRST_BLOCK = "first_block"
    MAGCACHE = "magcache"
    MEANCACHE = "meancache"
    TAYLORSEER = "taylorseer"
    BLOCKDANCE = "blockdance"
    DBCACHE = "dbcache"
    PAB = "pab"


def setting(default: Any, lo: float, hi: float, *, lo_open: bool = False) -> Any:
    """A config field with its allowed closed range ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``)."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi, lo_open)})


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """Base class of the strategy configs."""

    def validate(self, prefix: str) -> None:
        """Raise InvalidArgument naming the first field outside its range."""
        for f in dataclasses.fields(self):
            rng = f.metadata.get("range")
            if rng is None:
                continue
            lo, hi, lo_open = rng
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                bad = not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
                bad = bad or v > hi or (v <= lo if lo_open else v < lo)
                if bad:
                    allowed = f"{'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]"
                    kind = "an integer in " if isinstance(f.default, int) else ""
                    raise InvalidArgument(f"{prefix}.{f.name}={_num(v)} is out of range; allowed: {kind}{allowed}")

    def describe(self) -> str:
        return ",".join(f"{f.name}={_num(getattr(self, f.name))}" for f in dataclasses.fields(self))


def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v)) if not math.isinf(v) else str(v)
    if isinstance(v, tuple):
        return "[" + " ".join(_num(x) for x in v) + "]"
    return str(v)


S = TypeVar("S", bound="type[Strategy]")

_STRATEGIES: dict[StrategyName, type[Strategy]] = {}
"""Filled at import by ``register`` (one entry per strategy module, see ``denoiser_svc.cache.strategies``)."""


def register(name: StrategyName, config: type[StrategyConfig]) -> Callable[[S], S]:
    """Class decorator: register a strategy under ``name`` with its config dataclass."""
    def wrap(cls: S) -> S:
        if name in _STRATEGIES:
            raise ValueError(f"FlexCache strategy {name.value!r} is registered twice")
        cls.name = name
        cls.config_cls = config
        _STRATEGIES[name] = cls
        return cls

    return wrap


def strategy_names() -> list[str]:
    """Every registered strategy name, in declaration order."""
    _load()
    return [n.value for n in StrategyName if n in _STRATEGIES]


def get_strategy(name: str | StrategyName) -> type[Strategy]:
    """The strategy class registered under ``name``; unknown names raise InvalidArgument listing the valid ones."""
    _load()
    try:
        key = StrategyName(name)
    except ValueError:
        key = None
    if key is None or key not in _STRATEGIES:
        raise InvalidArgument(f"cache.strategy={str(getattr(name, 'value', name))!r} is not a FlexCache strategy; "
                              f"allowed: {strategy_names()}")
    return _STRATEGIES[key]


def _load() -> None:
    import denoiser_svc.cache.strategies  # noqa: F401  (each strategy module registers itself on import)
