"""Wan family (WanPipeline): Wan2.1-T2V 1.3B / 14B and Wan2.2-T2V-A14B (two experts).

- Encoder: UMT5 through the pipeline's own ``encode_prompt`` (its ``prompt_clean``, padding to
  ``max_sequence_length`` with the padded positions zeroed). True CFG: the negative prompt (default ``""``) is
  encoded whenever ``guidance_scale > 1`` (the pipeline's ``do_classifier_free_guidance``).
- Denoiser: video latents ``[1, C, (frames - 1) // 4 + 1, H / 8, W / 8]`` in float32 from the pipeline's
  ``prepare_latents``; the schedule is the checkpoint scheduler's own ``set_timesteps(steps)`` (UniPC with the flow
  shift of its config for the released checkpoints); each step runs the transformer on ``latents`` cast to its
  dtype, cond and uncond branches, ``uncond + g * (cond - uncond)``.
- Wan2.2-A14B: ``transformer`` (high noise) runs the steps whose timestep is ``>= boundary_ratio *
  num_train_timesteps``, ``transformer_2`` (low noise) the rest, with ``guidance_scale_2`` (default: guidance_scale).
  Each expert is its own denoiser group (``component``); ``expert_range`` says which steps a group runs, and the
  scheduler's multistep history travels with the latents at the hand-over (``scheduler_state``).
- VAE: ``AutoencoderKLWan`` (temporal, causal): un-normalise with ``latents_mean``/``latents_std``, decode,
  ``VideoProcessor.postprocess_video``; frames ``[F, H, W, 3]`` uint8.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from services.errors import InvalidArgument
from services.families.base import (
    Branch,
    DenoiseState,
    EncodedPrompt,
    FamilyAdapter,
    Limits,
    SamplingParams,
    SeqGather,
    SeqSplit,
    SequenceParallelPlan,
)
from services.families.cache_spec import CacheSpec
from services.families.loading import checkpoint_defaults, load_partial_pipeline
from services.families.step_constants import StepConstant, served, using
from services.families.text_limits import tokenizer_budget

PIPELINE_MAX_SEQUENCE_LENGTH = 512
"""WanPipeline.__call__'s default ``max_sequence_length`` (UMT5 tokens; shorter prompts are zero-padded to it)."""
DEFAULT_FPS = 16.0
"""Frame rate of the released Wan T2V models (diffusers' examples export at 16 fps)."""
DEFAULT_MAX_FRAMES = 161
"""Longest video accepted unless chitu.json says otherwise (twice the 81 frames the models were trained on)."""


@dataclass
class WanDenoiser:
    """What a Wan denoiser group holds: the partial pipeline (scheduler, latent helpers) and one expert."""

    pipe: Any
    transformer: torch.nn.Module
    component: str
    step_constants: dict[str, StepConstant] | None = None
    """Constant across a request's steps, computed once in ``prepare``: the rotary tables (they depend on the video's
    shape only) and the text projection of the prompt embeddings (``condition_embedder.text_embedder``)."""


class WanAdapter(FamilyAdapter):
    family = "wan"
    pipeline_classes = ("WanPipeline",)
    encoder_components = ("tokenizer", "text_encoder")
    denoiser_components = ("transformer", "scheduler")
    vae_components = ("vae",)
    guidance_kind = "cfg"

    def __init__(self, checkpoint):
        super().__init__(checkpoint)
        if self.model_index.get("expand_timesteps"):
            raise InvalidArgument(f"{self.checkpoint}: expand_timesteps=true (Wan2.2 TI2V-5B) is not supported; "
                                  "serve a T2V checkpoint (Wan2.1-T2V, Wan2.2-T2V-A14B)")

    # -- facts ---------------------------------------------------------------------------------------------------
    def expert_components(self) -> tuple[str, ...]:
        two = self.model_index.get("boundary_ratio") is not None and self.has_component("transformer_2")
        return ("transformer", "transformer_2") if two else ("transformer",)

    @property
    def boundary_ratio(self) -> float | None:
        return self.model_index.get("boundary_ratio") if len(self.expert_components()) == 2 else None

    def transformer_config(self) -> dict[str, Any]:
        return self.component_config(self.expert_components()[0])

    def vae_config(self) -> dict[str, Any]:
        try:
            return self.component_config("vae")
        except FileNotFoundError:
            return {}

    @property
    def vae_scale_factor_spatial(self) -> int:
        """As WanPipeline reads it from the VAE config (8 when absent)."""
        return int(self.vae_config().get("scale_factor_spatial") or 8)

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.vae_config().get("scale_factor_temporal") or 4)

    @property
    def max_sequence_length(self) -> int:
        """UMT5 token budget: the pipeline's 512, capped by the tokenizer's model_max_length."""
        return tokenizer_budget(self, PIPELINE_MAX_SEQUENCE_LENGTH)

    def limits(self) -> Limits:
        defaults = checkpoint_defaults(self.checkpoint)
        tcfg = self.transformer_config()
        patch = tcfg.get("patch_size", [1, 2, 2])
        multiple = self.vae_scale_factor_spatial * int(patch[1])
        rope = int(tcfg.get("rope_max_seq_len", 1024))
        t = self.vae_scale_factor_temporal
        # the rotary table has rope_max_seq_len positions per axis (latent frames, patch rows, patch columns)
        max_size = min(int(defaults.get("max_size", 1920)), rope * multiple)
        max_frames = min(int(defaults.get("max_frames", DEFAULT_MAX_FRAMES)), (rope // int(patch[0]) - 1) * t + 1)
        return Limits(
            size_multiple=multiple, min_size=multiple, max_size=max_size,
            max_prompt_tokens=self.max_sequence_length, guidance_kind="cfg",
            default_steps=int(defaults.get("steps", 50)),
            default_guidance_scale=float(defaults.get("guidance_scale", 5.0)),
            default_width=int(defaults.get("width", 832)), default_height=int(defaults.get("height", 480)),
            supports_video=True, frame_multiple=t, max_frames=max_frames,
            default_frames=int(defaults.get("frames", 81)), experts=len(self.expert_components()),
            default_fps=float(defaults.get("fps", DEFAULT_FPS)),
        )

    def validate_params(self, params: SamplingParams) -> None:
        super().validate_params(params)  # refuses guidance_scale_2 for a one-transformer checkpoint
        if params.guidance_scale_2 is not None and not 0 <= params.guidance_scale_2 < math.inf:
            raise InvalidArgument(f"guidance_scale_2={params.guidance_scale_2} must be a finite number >= 0")

    # -- schedule ----------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _scheduler_template(self) -> Any:
        import diffusers

        cls = getattr(diffusers, self.model_index["scheduler"][1])
        return cls.from_config(self.component_config("scheduler"))

    def boundary_step(self, steps: int) -> int:
        """Index of the first step the low-noise expert runs: the pipeline switches at the first timestep
        ``t < boundary_ratio * num_train_timesteps`` (timesteps decrease), so it is the count of ``t >= boundary``."""
        ratio = self.boundary_ratio
        if ratio is None:
            return steps
        scheduler = self.fresh_scheduler(self._scheduler_template)
        scheduler.set_timesteps(steps, device="cpu")
        boundary = ratio * scheduler.config.num_train_timesteps
        return int((scheduler.timesteps >= boundary).sum().item())

    def expert_range(self, component: str, params: SamplingParams) -> tuple[int, int]:
        lo, hi = super().expert_range(component, params)
        if len(self.expert_components()) == 1:
            return lo, hi
        b = self.boundary_step(params.steps)
        return (0, b) if component == "transformer" else (b, params.steps)

    # -- encoder stage ---------------------------------------------------------------------------------------------
    def load_encoder(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.encoder_components, dtype, device)

    def _count_tokens(self, model: Any, text: str) -> int:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return len(model.tokenizer(prompt_clean(text), add_special_tokens=True).input_ids)

    def encode(self, model: Any, prompt: str, negative_prompt: str | None, max_sequence_length: int = 0) -> EncodedPrompt:
        msl = max_sequence_length or self.max_sequence_length
        n_tokens = self._count_tokens(model, prompt)
        if n_tokens > msl:
            raise InvalidArgument(f"prompt is {n_tokens} tokens long; the limit of this model is {msl} tokens")
        warnings = []
        do_cfg = negative_prompt is not None
        if do_cfg and negative_prompt and (n_neg := self._count_tokens(model, negative_prompt)) > msl:
            warnings.append(f"negative_prompt is {n_neg} tokens long; the first {msl} are used")
        with torch.inference_mode():
            embeds, negative = model.encode_prompt(prompt=prompt, negative_prompt=negative_prompt,
                                                   do_classifier_free_guidance=do_cfg, max_sequence_length=msl,
                                                   device=model._execution_device)
        negs = {"prompt_embeds": negative} if do_cfg else {}
        return EncodedPrompt({"prompt_embeds": embeds}, negs, warnings=warnings, prompt_tokens=n_tokens)

    # -- denoiser stage --------------------------------------------------------------------------------------------
    def load_denoiser(self, dtype: torch.dtype, device: torch.device, component: str = "transformer") -> WanDenoiser:
        if component not in self.expert_components():
            raise InvalidArgument(f"component={component!r}: this {self.family} checkpoint has the transformer(s) "
                                  f"{list(self.expert_components())}")
        pipe = load_partial_pipeline(self, (component, "scheduler"), dtype, device)
        # without its VAE the pipeline falls back to 4 / 8: use the checkpoint's VAE config, as the full pipeline does
        pipe.vae_scale_factor_temporal = self.vae_scale_factor_temporal
        pipe.vae_scale_factor_spatial = self.vae_scale_factor_spatial
        transformer = getattr(pipe, component)
        constants = {"rope": StepConstant(transformer.rope),
                     "text": StepConstant(transformer.condition_embedder.text_embedder)}
        return WanDenoiser(pipe=pipe, transformer=transformer, component=component, step_constants=constants)

    def prepare(self, model: WanDenoiser, params: SamplingParams, conditionings: dict[str, torch.Tensor],
                negative_conditionings: dict[str, torch.Tensor], initial_latents: torch.Tensor | None,
                start_step: int, end_step: int) -> DenoiseState:
        transformer = model.transformer
        device, dtype = transformer.device, transformer.dtype
        do_cfg = params.guidance_scale > 1.0  # WanPipeline.do_classifier_free_guidance
        if "prompt_embeds" not in conditionings:
            raise InvalidArgument(f"conditionings lacks 'prompt_embeds' (got {sorted(conditionings)})")
        if do_cfg and "prompt_embeds" not in negative_conditionings:
            raise InvalidArgument(f"guidance_scale={params.guidance_scale} > 1 runs classifier-free guidance: "
                                  "negative_conditionings needs 'prompt_embeds' (encode the negative prompt)")
        text_dim = transformer.config.text_dim
        branch_inputs: dict[str, dict[str, Any]] = {}
        for branch, source in (("cond", conditionings), ("uncond", negative_conditionings)):
            if branch == "uncond" and not do_cfg:
                continue
            embeds = source["prompt_embeds"]
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[1] < 1 or embeds.shape[2] != text_dim:
                name = "conditionings" if branch == "cond" else "negative_conditionings"
                raise InvalidArgument(f"{name}['prompt_embeds'] has shape {list(embeds.shape)}; expected "
                                      f"[1, tokens, {text_dim}]")
            branch_inputs[branch] = {"encoder_hidden_states": embeds.to(device=device, dtype=dtype)}

        pipe = model.pipe
        scheduler = self.fresh_scheduler(pipe.scheduler)
        scheduler.set_timesteps(params.steps, device=device)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents = pipe.prepare_latents(1, transformer.config.in_channels, params.height, params.width, params.frames,
                                       torch.float32, device, generator, None)
        if initial_latents is not None:
            if tuple(initial_latents.shape) != tuple(latents.shape):
                raise InvalidArgument(f"initial_latents has shape {list(initial_latents.shape)}, expected "
                                      f"{list(latents.shape)} for {params.width}x{params.height}x{params.frames}")
            latents = initial_latents.to(device=device, dtype=torch.float32)
        scheduler.set_begin_index(start_step)
        guidance = params.guidance_scale
        if model.component == "transformer_2" and params.guidance_scale_2 is not None:
            guidance = params.guidance_scale_2
        extras: dict[str, Any] = {"transformer_dtype": dtype}
        if model.step_constants is not None:  # per branch: the text differs, the rotary tables are shared
            rope, text = model.step_constants["rope"], model.step_constants["text"]
            with torch.inference_mode():
                tables = rope.compute(latents)  # the tables depend on its shape only
                extras["step_constants"] = {
                    branch: [(rope, tables), (text, text.compute(inputs["encoder_hidden_states"]))]
                    for branch, inputs in branch_inputs.items()}
        return DenoiseState(latents=latents, timesteps=scheduler.timesteps, scheduler=scheduler,
                            branch_inputs=branch_inputs, guidance_scale=guidance, do_cfg=do_cfg,
                            start_step=start_step, end_step=end_step, total_steps=params.steps, extras=extras)

    def forward(self, model: WanDenoiser, state: DenoiseState, latents: torch.Tensor, step: int,
                branch: Branch) -> torch.Tensor:
        x = latents.to(state.extras["transformer_dtype"])
        timestep = state.timesteps[step].expand(x.shape[0])
        with using(served(state, branch)):
            return model.transformer(hidden_states=x, timestep=timestep, return_dict=False,
                                     **state.branch_inputs[branch])[0]

    def install_attention(self, model: WanDenoiser, ops: Any) -> int:
        from services.families.processors.wan import install

        return install(model.transformer, ops)

    def sequence_parallel_plan(self, component: str = "transformer") -> SequenceParallelPlan:
        """The video tokens are sharded after the patch embedding (at the first block) together with the rotary
        tables; the text stays whole on every rank (cross-attention K/V, no communication); the prediction is
        gathered at ``proj_out``, before the unpatchify reshape. (Per-token timesteps, Wan2.2-TI2V, are not served.)"""
        return SequenceParallelPlan(
            splits={"transformer.rope": (SeqSplit(0, 1, "video", on_output=True), SeqSplit(1, 1, "video", on_output=True)),
                    "transformer.blocks.0": (SeqSplit(0, 1, "video"),)},
            gathers={"transformer.proj_out": SeqGather(1, "video")},
            joint_layout=("video",),
            num_heads=int(self.component_config(component)["num_attention_heads"]),
        )

    def cache_spec(self, component: str = "transformer") -> CacheSpec:
        """One block list; a block takes (hidden, encoder_hidden, temb, rotary) and returns hidden (text only feeds
        the cross-attention). Per video token a block costs self-attention projections (4 d^2), cross-attention
        query/output (2 d^2) and the FFN (2 d f) multiply-adds, plus both attentions; TeaCache is not offered: no
        rescaling polynomial has been fitted for this family's modulated input."""
        cfg = self.component_config(component)
        dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        ffn = int(cfg["ffn_dim"])

        def block_cost(block_list: int, video_tokens: int, text_tokens: int) -> float:
            s, t = video_tokens, text_tokens
            return 2.0 * ((6 * dim * dim + 2 * dim * ffn) * s + 2 * dim * dim * t + 2 * s * s * dim + 2 * s * t * dim)

        def attention_cost(block_list: int, video_tokens: int, text_tokens: int) -> float:
            return 2.0 * (4 * dim * dim * video_tokens + 2 * video_tokens * video_tokens * dim)

        patch = tuple(int(x) for x in cfg.get("patch_size", (1, 2, 2)))

        def tokens(state: DenoiseState) -> tuple[int, int]:
            f, h, w = state.latents.shape[-3:]
            return (f // patch[0]) * (h // patch[1]) * (w // patch[2]), int(
                state.branch_inputs["cond"]["encoder_hidden_states"].shape[1])

        return CacheSpec(block_lists=("blocks",), num_blocks=(int(cfg["num_layers"]),), transformer="transformer",
                         context_arg=None, temb_arg="temb", block_output=("hidden",), attention="attn1",
                         block_cost=block_cost, attention_cost=attention_cost, tokens=tokens)

    def warmup_conditionings(self, model: WanDenoiser) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        dim = model.transformer.config.text_dim
        gen = torch.Generator("cpu").manual_seed(0)
        cond = torch.randn(1, self.max_sequence_length, dim, generator=gen)
        uncond = torch.randn(1, self.max_sequence_length, dim, generator=gen)
        return {"prompt_embeds": cond}, {"prompt_embeds": uncond}

    # -- VAE stage -------------------------------------------------------------------------------------------------
    def load_vae(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.vae_components, dtype, device)

    def latent_shape(self, params: SamplingParams) -> tuple[int, ...]:
        z = int(self.vae_config().get("z_dim", 16))
        s, t = self.vae_scale_factor_spatial, self.vae_scale_factor_temporal
        return (1, z, (params.frames - 1) // t + 1, params.height // s, params.width // s)

    def decode(self, model: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        vae = model.vae
        expected = self.latent_shape(params)
        if tuple(latents.shape) != expected:
            raise InvalidArgument(f"latents of shape {list(latents.shape)} do not fit {params.width}x{params.height}"
                                  f"x{params.frames} frames (expected {list(expected)})")
        with torch.inference_mode():
            x = latents.to(device=vae.device, dtype=vae.dtype)
            z = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            x = x / inv_std + mean
            video = vae.decode(x, return_dict=False)[0]
            video = model.video_processor.postprocess_video(video, output_type="pt")  # [B, F, C, H, W] in [0, 1]
        return self.to_uint8_frames(video[0])
