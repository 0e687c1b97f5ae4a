"""Writing a generation's result to disk: the media files plus a sidecar JSON per file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from services.proto.chitu.v1 import common_pb2, generation_pb2


def result_summary(result: generation_pb2.GenerationResult, params: dict[str, Any]) -> dict[str, Any]:
    """The sidecar: request parameters, settings used, timings, warnings."""
    timings = result.timings
    return {
        **params,
        "seed": result.seed, "width": result.width, "height": result.height, "frames": result.frames,
        "steps": result.steps, "guidance_scale": round(result.guidance_scale, 6), "fps": result.fps,
        **({"guidance_scale_2": round(result.guidance_scale_2, 6)} if result.guidance_scale_2 else {}),
        "warnings": list(result.warnings), "metadata": dict(result.metadata),
        "timings": {
            "total_seconds": timings.total_seconds, "queue_seconds": timings.queue_seconds,
            "stages": _stage_timings(timings.stages),
            "step_seconds": list(timings.step_seconds),
            **({"cache": cache} if (cache := cache_accounting(result.metadata)) else {}),
        },
    }


def cache_accounting(metadata: Any) -> dict[str, Any] | None:
    """The FlexCache accounting of a result (``cache.*`` metadata) as JSON values; None without a cache."""
    if "cache.strategy" not in metadata:
        return None
    return {"strategy": metadata["cache.strategy"], "config": metadata.get("cache.config", ""),
            "skipped_fraction": float(metadata.get("cache.skipped_fraction", 0.0)),
            "skipped_per_step": json.loads(metadata.get("cache.skipped_per_step", "[]")),
            "pattern": metadata.get("cache.pattern", ""), "hit_steps": int(metadata.get("cache.hit_steps", 0)),
            "memory_bytes": int(metadata.get("cache.memory_bytes", 0))}


def _stage_timings(stages: list[common_pb2.StageTiming]) -> dict[str, dict[str, Any]]:
    """Stage name -> time and endpoint; a stage run twice (Wan2.2's two denoiser groups) gets ``denoise_2``."""
    out: dict[str, dict[str, Any]] = {}
    for s in stages:
        name = base = common_pb2.Stage.Name(s.stage).removeprefix("STAGE_").lower()
        n = 1
        while name in out:
            n += 1
            name = f"{base}_{n}"
        out[name] = {"seconds": s.seconds, "endpoint": s.endpoint}
    return out


def write_result(out_dir: Path, request_id: str, result: generation_pb2.GenerationResult,
                 params: dict[str, Any]) -> list[Path]:
    """Write ``out_dir/<request_id>/<artifact>`` and ``<artifact stem>.json``; return the media paths."""
    folder = out_dir / request_id
    folder.mkdir(parents=True, exist_ok=True)
    summary = result_summary(result, {"request_id": request_id, **params})
    paths = []
    for art in result.artifacts:
        path = folder / art.name
        path.write_bytes(art.data)
        meta = {**summary, "artifact": {k: v for k, v in MessageToDict(art).items() if k != "data"}}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        paths.append(path)
    return paths
