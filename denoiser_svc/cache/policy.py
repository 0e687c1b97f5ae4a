"""A request's cache policy: from the proto (or a plain dict), validated against the served model.

Every message below names the field (``cache.<strategy>.<field>``) and the allowed values, so that bad input
becomes an INVALID_ARGUMENT that says what to fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from denoiser_svc.cache.registry import StrategyConfig, StrategyName, get_strategy, strategy_names
from services.errors import InvalidArgument
from services.families.cache_spec import CacheSpec
from services.proto.chitu.v1 import cache_pb2


@dataclass(frozen=True)
class CachePolicy:
    """A validated strategy choice with its settings."""

    strategy: StrategyName
    config: StrategyConfig


def _field_kind(f: dataclasses.Field) -> type:
    return type(f.default) if not isinstance(f.default, tuple) else tuple


def _build(name: str, values: dict[str, Any]) -> CachePolicy:
    cls = get_strategy(name)
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        f = fields.get(key)
        if f is None:
            raise InvalidArgument(f"cache.{name}.{key} is not a setting of {name}; allowed: {sorted(fields)}")
        kind = _field_kind(f)
        try:
            if kind is tuple:
                kwargs[key] = tuple(float(v) for v in value)
            elif kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                kwargs[key] = int(value)
            else:
                kwargs[key] = float(value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"cache.{name}.{key}={value!r} must be a{'n integer' if kind is int else ' number'}"
                                  ) from None
    config = cls.config_cls(**kwargs)
    config.validate(f"cache.{name}")
    return CachePolicy(cls.name, config)


def policy_from_proto(msg: cache_pb2.CachePolicy) -> CachePolicy:
    """The policy a ``CachePolicy`` message asks for (unset fields take their defaults), range-checked."""
    which = msg.WhichOneof("strategy")
    if which is None:
        raise InvalidArgument(f"cache.strategy is not set (an empty CachePolicy, or a strategy this server does not "
                              f"know); allowed: {strategy_names()}")
    sub = getattr(msg, which)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(get_strategy(which).config_cls):
        desc = sub.DESCRIPTOR.fields_by_name[f.name]
        if desc.is_repeated:
            if len(getattr(sub, f.name)):
                values[f.name] = list(getattr(sub, f.name))
        elif sub.HasField(f.name):
            values[f.name] = getattr(sub, f.name)
    return _build(which, values)


def policy_from_dict(data: dict[str, Any]) -> CachePolicy:
    """``{"strategy": "teacache", "threshold": 0.3}`` (YAML configs, the benchmark) -> a range-checked policy."""
    values = dict(data)
    name = values.pop("strategy", None)
    if not name:
        raise InvalidArgument(f"cache.strategy is not set; allowed: {strategy_names()}")
    return _build(str(name), values)


def policy_to_proto(policy: CachePolicy) -> cache_pb2.CachePolicy:
    msg = cache_pb2.CachePolicy()
    sub = getattr(msg, policy.strategy.value)
    sub.SetInParent()
    for f in dataclasses.fields(policy.config):
        value = getattr(policy.config, f.name)
        if isinstance(value, tuple):
            getattr(sub, f.name).extend(value)
        else:
            setattr(sub, f.name, value)
    return msg


CACHE_STRATEGIES_KEY = "cache_strategies"
"""Key of the denoiser's info metadata listing the strategies its model can use (comma-separated); the orchestrator
checks a request's policy against it before any stage works on the request."""


def usable_strategies(spec: CacheSpec | None) -> list[str]:
    """The strategies a model with ``spec`` can use (with their default settings)."""
    if spec is None:
        return []
    out = []
    for name in strategy_names():
        cls = get_strategy(name)
        if cls.unsupported_reason(spec) is not None:
            continue
        try:
            cls.check(cls.config_cls(), spec)
        except InvalidArgument:
            continue
        out.append(name)
    return out


def validate_for_model(policy: CachePolicy, spec: CacheSpec | None, family: str) -> None:
    """InvalidArgument unless the served model (its family's ``spec``) can run ``policy``."""
    name = policy.strategy.value
    allowed = usable_strategies(spec)
    if spec is None:
        raise InvalidArgument(f"cache.{name}: the {family} family supports no FlexCache strategy yet; send no cache "
                              f"policy (allowed: [])")
    cls = get_strategy(name)
    reason = cls.unsupported_reason(spec)
    if reason is not None:
        raise InvalidArgument(f"cache.{name}: the {family} family cannot use {name} ({reason}); allowed for this "
                              f"model: {allowed}")
    cls.check(policy.config, spec)
