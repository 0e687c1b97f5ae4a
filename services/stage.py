"""Helpers every stage service uses: model-name checks, info messages, a torch work thread."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from services.config import ModelConfig
from services.errors import InvalidArgument, NotFound
from services.families.base import FamilyAdapter, Limits
from services.metrics import memory_snapshot
from services.proto.chitu.v1 import common_pb2, vae_pb2

T = TypeVar("T")

MAX_PROMPT_CHARS = 8192
"""Longest prompt accepted, in characters, before any tokenization."""

_GUIDANCE = {"distilled": common_pb2.GUIDANCE_KIND_DISTILLED, "cfg": common_pb2.GUIDANCE_KIND_CFG,
             "none": common_pb2.GUIDANCE_KIND_NONE}

UNAVAILABLE_FORMAT_PREFIX = "unavailable_format."
"""VAE info metadata key prefix: ``unavailable_format.MEDIA_FORMAT_MP4`` -> why that format cannot be produced by that
process, and the fix (the orchestrator refuses such requests before any stage works on them)."""


def limits_to_proto(lim: Limits) -> common_pb2.ModelLimits:
    return common_pb2.ModelLimits(
        size_multiple=lim.size_multiple, min_size=lim.min_size, max_size=lim.max_size,
        max_prompt_tokens=lim.max_prompt_tokens, supports_video=lim.supports_video, frame_multiple=lim.frame_multiple,
        max_frames=lim.max_frames, guidance_kind=_GUIDANCE[lim.guidance_kind], default_steps=lim.default_steps,
        default_guidance_scale=lim.default_guidance_scale, default_width=lim.default_width,
        default_height=lim.default_height, default_frames=lim.default_frames, experts=lim.experts,
        default_fps=lim.default_fps,
        cfg_guidance_threshold=lim.cfg_threshold, cfg_needs_negative_prompt=lim.cfg_needs_negative_prompt,
    )


def limits_from_proto(msg: common_pb2.ModelLimits) -> Limits:
    kind = {v: k for k, v in _GUIDANCE.items()}.get(msg.guidance_kind, "none")
    return Limits(size_multiple=msg.size_multiple, min_size=msg.min_size, max_size=msg.max_size,
                  max_prompt_tokens=msg.max_prompt_tokens, guidance_kind=kind, default_steps=msg.default_steps,
                  default_guidance_scale=msg.default_guidance_scale, default_width=msg.default_width,
                  default_height=msg.default_height, supports_video=msg.supports_video,
                  frame_multiple=msg.frame_multiple or 1, max_frames=msg.max_frames or 1,
                  default_frames=msg.default_frames or 1, experts=msg.experts or 1, default_fps=msg.default_fps,
                  cfg_threshold=msg.cfg_guidance_threshold if msg.HasField("cfg_guidance_threshold") else 1.0,
                  cfg_needs_negative_prompt=msg.cfg_needs_negative_prompt)


def check_model(requested: str, model: ModelConfig) -> None:
    """NOT_FOUND listing the served names unless ``requested`` is one of them."""
    served = model.served_names()
    if requested not in served:
        raise NotFound(f"model {requested!r} is not served here; served: {served}")


def media_formats(formats: list[int], supports_video: bool, field: str) -> list[int]:
    """The requested output formats, deduplicated, with MEDIA_FORMAT_UNSPECIFIED (or none at all) meaning the model's
    default (MP4 for video, PNG for images); INVALID_ARGUMENT naming ``field`` for a value the enum does not define
    (a newer client, a corrupt message)."""
    known = set(vae_pb2.MediaFormat.values())
    unknown = [f for f in formats if f not in known]
    if unknown:
        names = [vae_pb2.MediaFormat.Name(v) for v in sorted(known) if v != vae_pb2.MEDIA_FORMAT_UNSPECIFIED]
        raise InvalidArgument(f"{field}: unknown value(s) {unknown}; use one of {names}")
    default = vae_pb2.MEDIA_FORMAT_MP4 if supports_video else vae_pb2.MEDIA_FORMAT_PNG
    return list(dict.fromkeys(default if f == vae_pb2.MEDIA_FORMAT_UNSPECIFIED else f for f in formats)) or [default]


def check_prompt(prompt: str, field: str = "prompt", allow_empty: bool = False) -> None:
    if not allow_empty and not prompt.strip():
        raise InvalidArgument(f"{field} must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"{field} is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")


def stage_info(model: ModelConfig, adapter: FamilyAdapter, stage: str, dtype: object, device: object,
               components: tuple[str, ...] | None = None, metadata: dict[str, str] | None = None) -> common_pb2.StageModelInfo:
    """The stage's self-description; metadata always carries the process's memory figures."""
    metadata = {**memory_snapshot(), **(metadata or {})}
    return common_pb2.StageModelInfo(
        model=model.served_name, family=adapter.family, components=list(components or adapter.stage_components(stage)),
        checkpoint=str(adapter.checkpoint), dtype=str(dtype).removeprefix("torch."), device=str(device),
        limits=limits_to_proto(adapter.limits()), metadata=metadata, aliases=list(model.aliases),
    )


class WorkThread:
    """One thread for a stage's torch work: keeps the event loop free and orders device work.

    ``run`` carries the caller's contextvars (the request id of log lines) into the thread.
    """

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self._pool, functools.partial(ctx.run, fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
