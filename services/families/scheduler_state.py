"""A scheduler's per-run state as named tensors, so that a second denoiser group can resume a run exactly.

Multistep schedulers (UniPC, DPM-Solver) keep a history between steps: the last model outputs, the last sample,
how many lower-order warm-up steps were taken. When Wan2.2's high-noise expert hands the latents to the group
running the low-noise expert, the diffusers pipeline keeps using the *same* scheduler object, so the second group
must resume with that history or its first step (UniPC's corrector, the second-order predictor) differs.

What travels: the attributes in ``STATE_ATTRIBUTES`` that the scheduler has, everything ``step`` mutates except
the step index (the receiving group sets it with ``set_begin_index(start_step)``). Names encode structure and
Python type, so no side channel is needed:

- ``last_sample``: a tensor attribute; ``model_outputs.1``: item 1 of a list attribute (``None`` items are left out);
- ``lower_order_nums#int`` / ``dt#float``: a Python number, carried as a 0-d int64 / float64 tensor.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from services.errors import InvalidArgument

STATE_ATTRIBUTES: tuple[str, ...] = (
    "model_outputs", "timestep_list", "last_sample", "lower_order_nums", "this_order",  # UniPC, DPM-Solver
    "sample", "prev_derivative", "dt",  # single-step / Heun-style schedulers
)
"""Per-run attributes of diffusers schedulers that ``step`` mutates (besides ``_step_index``)."""

NUMBERS: dict[str, str] = {"lower_order_nums": "int", "this_order": "int", "dt": "float"}
"""The attributes that hold a Python number (sent as ``name#int`` / ``name#float``); every other one holds tensors."""

SAMPLE_SHAPED: frozenset[str] = frozenset({"model_outputs", "last_sample", "sample", "prev_derivative"})
"""The attributes (or list items) that hold a tensor of the latents' shape: checked against the request's latents on
import, so a state exported from a run of another size is refused before the run, not inside its first step."""

_NAME = re.compile(r"^(?P<attr>[a-z_]+)(?:\.(?P<index>\d+))?(?:#(?P<kind>int|float))?$")


def _encode(value: Any) -> tuple[str, torch.Tensor] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return "", value.detach().to("cpu")
    if isinstance(value, bool):
        raise TypeError("bool scheduler state is not supported")
    if isinstance(value, int):
        return "#int", torch.tensor(value, dtype=torch.int64)
    if isinstance(value, float):
        return "#float", torch.tensor(value, dtype=torch.float64)
    raise TypeError(f"scheduler state of type {type(value).__name__} cannot travel")


def export_state(scheduler: Any) -> dict[str, torch.Tensor]:
    """The per-run state of ``scheduler`` as named CPU tensors (see the module docstring for the names)."""
    out: dict[str, torch.Tensor] = {}
    for attr in STATE_ATTRIBUTES:
        if not hasattr(scheduler, attr):
            continue
        value = getattr(scheduler, attr)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            encoded = _encode(item)
            if encoded is None:
                continue
            suffix, tensor = encoded
            name = attr if index is None else f"{attr}.{index}"
            out[name + suffix] = tensor
    return out


def import_state(scheduler: Any, tensors: dict[str, torch.Tensor], device: torch.device,
                 latents_shape: tuple[int, ...] | None = None) -> None:
    """Restore ``export_state``'s output into a scheduler prepared for the same schedule (``set_timesteps`` done).

    Raises InvalidArgument naming the entry when a name does not fit this scheduler, or (given ``latents_shape``) a
    sample-shaped entry is not a floating-point tensor of the request's latents' shape.
    """
    for name, tensor in sorted(tensors.items()):
        m = _NAME.match(name)
        attr = m["attr"] if m else ""
        # attributes a fresh scheduler may lack (UniPC's this_order exists only after a step) are accepted
        if not m or attr not in STATE_ATTRIBUTES:
            raise InvalidArgument(f"scheduler_state: {name!r} is not a scheduler state entry (attributes: "
                                  f"{list(STATE_ATTRIBUTES)}, list items as name.N, numbers as name#int/name#float)")
        if (m["kind"] is not None) != (attr in NUMBERS) or (attr in NUMBERS and m["kind"] != NUMBERS[attr]):
            what = f"a number, sent as {attr}#{NUMBERS[attr]}" if attr in NUMBERS else "tensors, not numbers"
            raise InvalidArgument(f"scheduler_state: {name!r}: {attr} holds {what}")
        if m["kind"] is not None:
            if tensor.numel() != 1 or not math.isfinite(float(tensor.item())):
                raise InvalidArgument(f"scheduler_state: {name!r} must hold one finite number, got "
                                      f"{tensor.flatten()[:4].tolist()} (shape {list(tensor.shape)})")
            value: Any = int(tensor.item()) if m["kind"] == "int" else float(tensor.item())
            order = getattr(getattr(scheduler, "config", None), "solver_order", None)
            low = 1 if attr == "this_order" else 0
            if attr in ("this_order", "lower_order_nums") and order is not None and not low <= value <= order:
                raise InvalidArgument(f"scheduler_state: {name!r} = {value} must be in [{low}, {order}] (this "
                                      f"scheduler's solver_order)")
        else:
            if latents_shape is not None and attr in SAMPLE_SHAPED and (
                    tuple(tensor.shape) != tuple(latents_shape) or not tensor.is_floating_point()):
                raise InvalidArgument(f"scheduler_state: {name!r} is a {tensor.dtype} tensor of shape "
                                      f"{list(tensor.shape)}; this request's latents are floating point of shape "
                                      f"{list(latents_shape)} (hand over the state of a run of the same size)")
            value = tensor.to(device)
        if m["index"] is None:
            if isinstance(getattr(scheduler, attr, None), list):
                raise InvalidArgument(f"scheduler_state: {name!r}: {attr} is a list; send its items as {attr}.N")
            setattr(scheduler, attr, value)
            continue
        current = getattr(scheduler, attr)
        index = int(m["index"])
        if not isinstance(current, list) or index >= len(current):
            size = len(current) if isinstance(current, list) else "not a list"
            raise InvalidArgument(f"scheduler_state: {name!r} is out of range for {attr} ({size})")
        current = list(current)
        current[index] = value
        setattr(scheduler, attr, current)
