"""Counting how often the modules behind step constants really compute (tests of the lean step paths)."""

from __future__ import annotations

from typing import Any


def count_calls(constants: dict[str, Any]) -> dict[str, int]:
    """Wrap each ``StepConstant``'s own forward (its module computing, in ``prepare`` or in a forward that is not
    served) so that every computation is counted; returns the live counts by name."""
    calls = dict.fromkeys(constants, 0)
    for name, constant in constants.items():
        inner = constant._forward

        def counting(*args: Any, _name: str = name, _inner: Any = inner, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _inner(*args, **kwargs)

        constant._forward = counting
    return calls
