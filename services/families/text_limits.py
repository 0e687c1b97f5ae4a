"""Prompt-length helpers shared by the families whose text encoder is a Qwen model (FLUX.2-klein, Qwen-Image,
Z-Image): the token budget from the checkpoint's tokenizer config and an actionable error past it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from services.errors import InvalidArgument

if TYPE_CHECKING:
    from services.families.base import FamilyAdapter


def tokenizer_budget(adapter: FamilyAdapter, cap: int, component: str = "tokenizer") -> int:
    """The tokenizer's ``model_max_length`` capped at ``cap`` (the pipeline's default ``max_sequence_length``)."""
    path = adapter.checkpoint / component / "tokenizer_config.json"
    length = cap
    if path.is_file():
        length = int(json.loads(path.read_text()).get("model_max_length", cap))
    return min(length, cap)


def check_tokens(n_tokens: int, limit: int, what: str = "prompt") -> None:
    """INVALID_ARGUMENT when a prompt (as the pipeline templates it) is longer than the model's token budget; the
    pipelines would silently truncate it."""
    if n_tokens > limit:
        raise InvalidArgument(f"{what} is {n_tokens} tokens long (with the model's chat template); the limit of this "
                              f"model is {limit} tokens")
