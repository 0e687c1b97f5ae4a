"""The family adapter contract: everything model-family-specific lives behind it.

A family adapter is built for one checkpoint folder (it reads ``model_index.json`` and component configs, never
weights) and tells each stage what to load and how to run it, reusing the family's diffusers pipeline helpers
(``encode_prompt``, ``prepare_latents``, packing/unpacking, timestep schedules) so that the split services compute
exactly what the pipeline computes in one process. No code outside ``services/families`` checks model names.

Stage contract, in the order a generation uses it:

- encoder stage: ``load_encoder`` -> ``encode`` (conditioning tensors by name, negative ones for true CFG);
- denoiser stage: ``load_denoiser`` -> ``prepare`` (initial latents, schedule, per-branch forward inputs built
  once) -> per step ``forward`` (one transformer call for one CFG branch), ``combine`` (CFG mixing),
  ``scheduler_step``;
- VAE stage: ``load_vae`` -> ``decode`` (uint8 frames, ``[F, H, W, 3]``).
"""

from __future__ import annotations

import copy
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from services.errors import InvalidArgument
from services.families.cache_spec import CacheSpec

Branch = Literal["cond", "uncond"]
BRANCHES: tuple[Branch, Branch] = ("cond", "uncond")

GuidanceKind = Literal["distilled", "cfg", "none"]


@dataclass(frozen=True)
class SeqSplit:
    """One tensor that a denoiser group shards along its sequence dimension at a module boundary.

    Each sequence-parallel rank keeps one contiguous shard; a sequence whose length does not divide the degree is
    zero-padded at its end, and the padded keys are masked out of every attention (see ``SequenceParallelPlan``).
    """

    key: str | int
    """Keyword argument name, or position of a positional argument (of the output tuple when ``on_output``)."""
    dim: int
    """The sequence dimension of that tensor."""
    segment: str | tuple[str, ...]
    """Which token sequence it belongs to (``text``, ``image``, ``video``): tensors of one segment are padded
    alike, and ``SequenceParallelPlan.joint_layout`` says where each segment sits in the attention sequence. A tuple
    means the dimension is those segments concatenated (Flux's rotary table over text then image tokens): each part
    is split on its own and this rank's parts are concatenated; their lengths must be known from earlier splits."""
    on_output: bool = False
    """Split the module's output instead of its input (rotary tables computed from the whole sequence)."""


@dataclass(frozen=True)
class SeqGather:
    """A module output that is gathered back to the whole sequence (and unpadded) on every rank."""

    dim: int
    """The sequence dimension of the output."""
    segment: str
    """Its segment (to drop that segment's padding)."""
    index: int | None = None
    """Element of a tuple output; None when the output is a tensor."""


@dataclass(frozen=True)
class SequenceParallelPlan:
    """How a family's transformer is sequence-sharded (the denoiser group applies it with module hooks).

    Module paths are relative to the handle ``load_denoiser`` returns (``transformer.proj_out``). Every split
    runs once per transformer call; the gathers restore the full sequence before anything that is not per-token.
    """

    splits: dict[str, tuple[SeqSplit, ...]]
    """Module path -> tensors split at that module."""
    gathers: dict[str, SeqGather]
    """Module path -> output gathered there."""
    joint_layout: tuple[str, ...]
    """Segments, in order, of the sequence ``AttentionOps.joint`` receives (Flux: text then image)."""
    num_heads: int
    """Attention heads (``ulysses_degree`` must divide it)."""


@dataclass(frozen=True)
class Limits:
    """Request limits of a served model (mirrors ``chitu.v1.ModelLimits``)."""

    size_multiple: int
    min_size: int
    max_size: int
    max_prompt_tokens: int
    guidance_kind: GuidanceKind
    default_steps: int
    default_guidance_scale: float
    default_width: int
    default_height: int
    supports_video: bool = False
    frame_multiple: int = 1
    max_frames: int = 1
    default_frames: int = 1
    experts: int = 1
    """Transformers the schedule is split between (2 for Wan2.2-A14B: one denoiser group each)."""
    default_fps: float = 0.0
    """Frame rate of encoded video when a request sets none (video families)."""
    cfg_threshold: float = 1.0
    """With ``guidance_kind == "cfg"``: CFG runs only when guidance_scale is above this (Z-Image: 0)."""
    cfg_needs_negative_prompt: bool = False
    """With ``guidance_kind == "cfg"``: CFG runs only with a non-empty negative prompt (Qwen-Image's true CFG)."""

    def cfg_active(self, guidance_scale: float, negative_prompt: str) -> bool:
        """Whether the family's pipeline runs both CFG branches for these settings (the one rule the orchestrator,
        encoder and denoiser share)."""
        return (self.guidance_kind == "cfg" and guidance_scale > self.cfg_threshold
                and (bool(negative_prompt) or not self.cfg_needs_negative_prompt))


@dataclass(frozen=True)
class SamplingParams:
    """Validated settings of one generation, defaults filled in."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    frames: int = 1
    guidance_scale_2: float | None = None
    """Guidance of the second expert (two-expert families); None means guidance_scale."""


@dataclass
class EncodedPrompt:
    """Output of the encoder stage."""

    conditionings: dict[str, torch.Tensor]
    negative_conditionings: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    prompt_tokens: int = 0


@dataclass
class DenoiseState:
    """Per-request state of the denoising loop, identical on every rank of a denoiser group.

    ``branch_inputs`` holds the transformer's keyword inputs that do not change across steps, per CFG branch,
    built once in ``prepare``. ``latents`` is replaced after every ``scheduler_step``.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Any
    branch_inputs: dict[str, dict[str, Any]]
    guidance_scale: float
    do_cfg: bool
    start_step: int
    end_step: int
    total_steps: int
    extras: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    """The request this state belongs to (set by the denoiser's runner; keys its FlexCache session)."""

    @property
    def branches(self) -> tuple[Branch, ...]:
        return BRANCHES if self.do_cfg else ("cond",)


def sequence_embeds(conds: dict[str, torch.Tensor], name: str, width: int, where: str) -> torch.Tensor:
    """``conds[name]``, checked to be one prompt's ``[1, L, width]`` embeddings with ``L >= 1`` (INVALID_ARGUMENT
    naming ``where`` and the field otherwise)."""
    t = conds.get(name)
    if t is None:
        raise InvalidArgument(f"{where} lacks {name!r} (got {sorted(conds)})")
    if t.ndim != 3 or t.shape[0] != 1 or t.shape[2] != width or t.shape[1] < 1:
        raise InvalidArgument(f"{where}[{name!r}] has shape {list(t.shape)}; expected [1, L, {width}]")
    return t


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def packed_latent_shape(height: int, width: int, scale_factor: int, latent_channels: int) -> tuple[int, int, int]:
    """``[1, (H/2s)(W/2s), 4C]``: the latents of the Flux-style pipelines (Flux.1, FLUX.2, Qwen-Image), 2x2 patches of
    the VAE's ``C``-channel latents packed per token (``s``: the VAE's scale factor)."""
    grid = 2 * scale_factor
    return 1, (height // grid) * (width // grid), 4 * latent_channels


def check_latents(latents: torch.Tensor, expected: tuple[int, ...], params: SamplingParams) -> None:
    """INVALID_ARGUMENT unless ``latents`` is a batch (B >= 1) of latents of the ``expected`` shape (dim 0: batch)."""
    tail = tuple(expected[1:])
    if latents.ndim != len(expected) or latents.shape[0] < 1 or tuple(latents.shape[1:]) != tail:
        raise InvalidArgument(f"latents of shape {list(latents.shape)} do not fit {params.width}x{params.height} "
                              f"(expected [B >= 1, {', '.join(map(str, tail))}])")


class FamilyAdapter(ABC):
    """Base class of the per-family adapters (one module per family in ``services/families``)."""

    family: ClassVar[str]
    """Short family name (``flux``, ``wan``, ...)."""
    pipeline_classes: ClassVar[tuple[str, ...]]
    """``_class_name`` values in model_index.json that this adapter serves."""
    encoder_components: ClassVar[tuple[str, ...]]
    """Checkpoint components the encoder stage loads."""
    denoiser_components: ClassVar[tuple[str, ...]]
    """Checkpoint components the denoiser stage loads (the expert's transformer is chosen by ``component``)."""
    vae_components: ClassVar[tuple[str, ...]]
    """Checkpoint components the VAE stage loads."""
    guidance_kind: ClassVar[GuidanceKind]
    """How guidance_scale is used."""

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        self.model_index = read_json(self.checkpoint / "model_index.json")

    # -- facts ---------------------------------------------------------------------------------------------------
    def component_config(self, component: str) -> dict[str, Any]:
        folder = self.checkpoint / component
        for name in ("config.json", "scheduler_config.json"):
            if (folder / name).is_file():
                return read_json(folder / name)
        raise FileNotFoundError(f"{folder} has no config.json")

    def has_component(self, component: str) -> bool:
        entry = self.model_index.get(component)
        return isinstance(entry, list) and entry[0] is not None and (self.checkpoint / component).is_dir()

    @abstractmethod
    def limits(self) -> Limits:
        """Request limits derived from the checkpoint's configs."""

    def stage_components(self, stage: str) -> tuple[str, ...]:
        return {"encoder": self.encoder_components, "denoiser": self.denoiser_components,
                "vae": self.vae_components}[stage]

    def validate_params(self, params: SamplingParams) -> None:
        """Raise InvalidArgument naming the field when ``params`` do not fit this model."""
        lim = self.limits()
        for name, value in (("width", params.width), ("height", params.height)):
            if value % lim.size_multiple:
                raise InvalidArgument(f"{name}={value} must be a multiple of {lim.size_multiple} for the "
                                      f"{self.family} family")
            if not lim.min_size <= value <= lim.max_size:
                raise InvalidArgument(f"{name}={value} must be in [{lim.min_size}, {lim.max_size}]")
        if not 1 <= params.steps <= 1000:
            raise InvalidArgument(f"steps={params.steps} must be in [1, 1000]")
        if not 0 <= params.guidance_scale < math.inf:  # also rejects NaN
            raise InvalidArgument(f"guidance_scale={params.guidance_scale} must be a finite number >= 0")
        if params.guidance_scale_2 is not None and lim.experts < 2:
            raise InvalidArgument(f"guidance_scale_2 is only used by two-expert models (Wan2.2-A14B); the "
                                  f"{self.family} checkpoint has one transformer: leave it unset")
        if lim.supports_video:
            if params.frames < 1 or (params.frames - 1) % lim.frame_multiple or params.frames > lim.max_frames:
                raise InvalidArgument(f"frames={params.frames} must be k*{lim.frame_multiple}+1 and at most "
                                      f"{lim.max_frames} for the {self.family} family")
        elif params.frames != 1:
            raise InvalidArgument(f"frames={params.frames}: {self.family} generates images; leave frames at 0 or 1")

    # -- encoder stage ---------------------------------------------------------------------------------------------
    @abstractmethod
    def load_encoder(self, dtype: torch.dtype, device: torch.device) -> Any:
        """Load only tokenizers and text encoders; return the handle ``encode`` takes."""

    @abstractmethod
    def encode(self, model: Any, prompt: str, negative_prompt: str | None, max_sequence_length: int = 0) -> EncodedPrompt:
        """Encode a prompt (and the negative prompt when not None) as the family's pipeline does."""

    # -- denoiser stage --------------------------------------------------------------------------------------------
    @abstractmethod
    def load_denoiser(self, dtype: torch.dtype, device: torch.device, component: str = "transformer") -> Any:
        """Load only the transformer (``component``) and the scheduler config; return the handle for ``prepare``."""

    @abstractmethod
    def prepare(self, model: Any, params: SamplingParams, conditionings: dict[str, torch.Tensor],
                negative_conditionings: dict[str, torch.Tensor], initial_latents: torch.Tensor | None,
                start_step: int, end_step: int) -> DenoiseState:
        """Build the request's state: initial latents (seeded as the pipeline does), schedule, branch inputs."""

    @abstractmethod
    def forward(self, model: Any, state: DenoiseState, latents: torch.Tensor, step: int, branch: Branch) -> torch.Tensor:
        """One transformer call for one CFG branch at step index ``step``; returns the model prediction."""

    def expert_components(self) -> tuple[str, ...]:
        """The transformers the schedule is split between, in schedule order; one denoiser group runs each."""
        return ("transformer",)

    def expert_range(self, component: str, params: SamplingParams) -> tuple[int, int]:
        """The steps ``[lo, hi)`` of the schedule that transformer ``component`` runs (all of them for one expert)."""
        if component not in self.expert_components():
            raise InvalidArgument(f"component={component!r}: the {self.family} family has {self.expert_components()}")
        return 0, params.steps

    def export_scheduler_state(self, state: DenoiseState) -> dict[str, torch.Tensor]:
        """The scheduler's per-run state (multistep history) as named CPU tensors, for a hand-over to another group."""
        from services.families.scheduler_state import export_state

        return export_state(state.scheduler)

    def import_scheduler_state(self, state: DenoiseState, tensors: dict[str, torch.Tensor]) -> None:
        """Resume ``state``'s freshly prepared scheduler from ``export_scheduler_state``'s output."""
        from services.families.scheduler_state import import_state

        import_state(state.scheduler, tensors, state.latents.device, tuple(state.latents.shape))

    def install_attention(self, model: Any, ops: Any) -> int:
        """Route every attention module of the loaded transformer through ``ops`` (``services.attention.AttentionOps``:
        backend choice, sequence parallelism). Returns the number of modules changed; 0 means this family still
        runs diffusers' own processors (no sequence parallelism, default kernels)."""
        return 0

    def sequence_parallel_plan(self, component: str = "transformer") -> SequenceParallelPlan | None:
        """How to shard this family's ``component`` transformer for sequence parallelism (from configs only, so a
        group can check its layout before loading weights). None: the family runs with sequence degree 1 only."""
        return None

    def cache_spec(self, component: str = "transformer") -> CacheSpec | None:
        """What FlexCache needs to know about transformer ``component`` (block lists, block call convention, the
        timestep-modulated input, costs), from configs only so that a request's cache policy is validated before any
        weights are touched. None: this family supports no feature cache."""
        return None

    def warmup_conditionings(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Synthetic (conditionings, negative_conditionings) of the right shapes for a start-up warm-up run."""
        return None

    def combine(self, state: DenoiseState, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance mixing of the two branch predictions."""
        return uncond + state.guidance_scale * (cond - uncond)

    def scheduler_step(self, state: DenoiseState, noise_pred: torch.Tensor, step: int) -> torch.Tensor:
        return state.scheduler.step(noise_pred, state.timesteps[step], state.latents, return_dict=False)[0]

    # -- VAE stage -------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_vae(self, dtype: torch.dtype, device: torch.device) -> Any:
        """Load only the VAE; return the handle ``decode`` takes."""

    @abstractmethod
    def decode(self, model: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Decode the denoiser's latents to uint8 frames ``[F, H, W, 3]`` exactly as the pipeline post-processes."""

    @abstractmethod
    def latent_shape(self, params: SamplingParams) -> tuple[int, ...]:
        """The shape of the latents ``prepare`` makes (and ``decode`` takes) for ``params``, from the checkpoint's
        configs alone (the VAE stage warms up on latents of this shape without loading the transformer)."""

    # -- helpers shared by adapters ----------------------------------------------------------------------------------
    @staticmethod
    def fresh_scheduler(scheduler: Any) -> Any:
        """A per-request copy of the loaded scheduler (schedulers keep per-run state)."""
        return copy.deepcopy(scheduler)

    @staticmethod
    def to_uint8_frames(images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] floats in [0, 1] -> [N, H, W, C] uint8, rounding as diffusers' ``numpy_to_pil`` does."""
        arr = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        return torch.from_numpy((arr * 255).round().astype("uint8"))
