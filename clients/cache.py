"""Client-side FlexCache policies: ``"teacache:threshold=0.3,warmup_steps=2"`` or ``{"strategy": "teacache",
"threshold": 0.3}`` -> ``chitu.v1.CachePolicy``.

Only names are checked here (from the proto, so this module needs no torch); ranges and whether the model can use
the strategy are checked by the denoiser, which answers INVALID_ARGUMENT naming the field and the allowed values.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from services.proto.chitu.v1 import cache_pb2


def strategies() -> list[str]:
    """The strategy names of ``CachePolicy``'s oneof, in proto order."""
    return [f.name for f in cache_pb2.CachePolicy.DESCRIPTOR.oneofs_by_name["strategy"].fields]


def parse_spec(text: str) -> dict[str, Any]:
    """``"name"`` or ``"name:key=value,key=value"`` -> ``{"strategy": name, key: value, ...}`` (values as text)."""
    name, _, rest = text.partition(":")
    out: dict[str, Any] = {"strategy": name.strip()}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"cache setting {item!r} must be key=value")
        out[key.strip()] = value.strip()
    return out


def cache_policy(spec: str | dict[str, Any]) -> cache_pb2.CachePolicy:
    """The ``CachePolicy`` message for ``spec`` (see module doc); ValueError names an unknown strategy or setting."""
    data = parse_spec(spec) if isinstance(spec, str) else dict(spec)
    name = str(data.pop("strategy", ""))
    if name not in strategies():
        raise ValueError(f"cache strategy {name!r} is unknown; allowed: {strategies()}")
    msg = cache_pb2.CachePolicy()
    sub = getattr(msg, name)
    sub.SetInParent()
    fields = sub.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            raise ValueError(f"cache.{name}.{key} is not a setting of {name}; allowed: {sorted(fields)}")
        cast = int if field.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64) else float
        try:
            if field.is_repeated:
                items = value.split() if isinstance(value, str) else value
                getattr(sub, key).extend(cast(v) for v in items)
            else:
                setattr(sub, key, cast(value))
        except (TypeError, ValueError):
            raise ValueError(f"cache.{name}.{key}={value!r} must be {'an integer' if cast is int else 'a number'}"
                             ) from None
    return msg
