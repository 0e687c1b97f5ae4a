"""Qwen-Image family (QwenImagePipeline): Qwen2.5-VL last-hidden-state conditioning of variable length, packed
2x2 latents, dynamic-shift schedule, true CFG with a negative prompt and norm rescaling.

- Encoder: the pipeline's ``encode_prompt`` (its system-prompt template; the template's first 34 tokens are
  dropped; only the prompt's valid tokens are kept) -> ``prompt_embeds`` ``[1, L, 3584]``. The pipeline returns a
  mask only when some positions are padding, which never happens for one prompt; if it does, it travels as
  ``prompt_embeds_mask`` ``[1, L]`` (int64, 1 = token) and becomes the attention key-padding mask.
- Guidance: true CFG exactly as ``QwenImagePipeline``: it runs only when ``guidance_scale`` (the pipeline's
  ``true_cfg_scale``) is above 1 *and* a negative prompt is given; then
  ``comb = uncond + g * (cond - uncond)`` rescaled per token to the conditional prediction's norm
  (``comb * ||cond|| / ||comb||`` over the channel axis). ``Limits.cfg_needs_negative_prompt`` tells the orchestrator.
- Denoiser: ``prepare_latents`` -> packed latents ``[1, (H/16)(W/16), 4C]``, ``img_shapes`` for the RoPE grid, sigmas
  ``linspace(1, 1/steps, steps)`` with ``mu = calculate_shift(N, ...)`` from the scheduler config; the transformer sees
  ``t / 1000``.
- VAE: unpack to ``[1, C, 1, H/8, W/8]``, ``x / (1 / latents_std) + latents_mean``, decode, first frame,
  ``VaeImageProcessor.postprocess``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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
    check_latents,
    packed_latent_shape,
    sequence_embeds,
)
from services.families.cache_spec import CacheSpec
from services.families.loading import checkpoint_defaults, load_partial_pipeline
from services.families.step_constants import StepConstant, served, using
from services.families.text_limits import check_tokens, tokenizer_budget

PIPELINE_MAX_SEQUENCE_LENGTH = 512
"""QwenImagePipeline.__call__'s default ``max_sequence_length`` (prompt tokens after the template prefix)."""


def _branch_conditioning(conds: dict[str, torch.Tensor], width: int, where: str
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    embeds = sequence_embeds(conds, "prompt_embeds", width, where)
    mask = conds.get("prompt_embeds_mask")
    if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise InvalidArgument(f"{where}['prompt_embeds_mask'] has shape {list(mask.shape)}; expected "
                              f"{list(embeds.shape[:2])}")
    if mask is not None and not ((mask == 0) | (mask == 1)).all():
        raise InvalidArgument(f"{where}['prompt_embeds_mask'] must hold only 0 (padding) and 1 (token)")
    return embeds, mask


def _check_text_positions(transformer: Any, branches: dict[str, tuple[torch.Tensor, Any]], params: SamplingParams,
                          patch_pixels: int) -> None:
    """The text tokens' rotary positions follow the image's in one fixed table (4096 rows in diffusers 0.42): the text
    must fit after the image's largest index, or the forward fails on a shape mismatch (INTERNAL). Only prompts far
    longer than the encoder's budget get here (a direct DenoiseRequest)."""
    rope = getattr(transformer, "pos_embed", None)
    table = getattr(rope, "pos_freqs", None)
    if table is None:
        return
    w_tokens, h_tokens = params.width // patch_pixels, params.height // patch_pixels
    start = max(h_tokens // 2, w_tokens // 2) if getattr(rope, "scale_rope", False) else max(h_tokens, w_tokens)
    limit = table.shape[0] - start
    for branch, (embeds, _mask) in branches.items():
        if embeds.shape[1] > limit:
            where = "conditionings" if branch == "cond" else "negative_conditionings"
            raise InvalidArgument(f"{where}['prompt_embeds'] has {embeds.shape[1]} tokens; at most {limit} fit this "
                                  f"model's rotary table at {params.width}x{params.height}")


class QwenImageAdapter(FamilyAdapter):
    family = "qwen_image"
    pipeline_classes = ("QwenImagePipeline",)
    encoder_components = ("tokenizer", "text_encoder")
    denoiser_components = ("transformer", "scheduler")
    vae_components = ("vae",)
    guidance_kind = "cfg"

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """2 ** len(temperal_downsample), as the pipeline computes it (8 when the VAE config is absent)."""
        try:
            return 2 ** len(self.component_config("vae")["temperal_downsample"])
        except FileNotFoundError:
            return 8

    @property
    def max_sequence_length(self) -> int:
        return tokenizer_budget(self, PIPELINE_MAX_SEQUENCE_LENGTH)

    def limits(self) -> Limits:
        defaults = checkpoint_defaults(self.checkpoint)
        multiple = self.vae_scale_factor * 2
        return Limits(
            size_multiple=multiple, min_size=multiple, max_size=defaults.get("max_size", 2048),
            max_prompt_tokens=self.max_sequence_length, guidance_kind="cfg",
            default_steps=defaults.get("steps", 50), default_guidance_scale=defaults.get("guidance_scale", 4.0),
            default_width=defaults.get("width", 1024), default_height=defaults.get("height", 1024),
            cfg_threshold=1.0, cfg_needs_negative_prompt=True,
        )

    def validate_params(self, params: SamplingParams) -> None:
        super().validate_params(params)
        # the scheduler stretches its sigmas to end at shift_terminal: one step divides 0 by 0 (NaN latents, no error)
        try:
            terminal = self.component_config("scheduler").get("shift_terminal")
        except FileNotFoundError:
            terminal = None
        if terminal and params.steps < 2:
            raise InvalidArgument(f"steps={params.steps}: this checkpoint's scheduler (shift_terminal={terminal}) needs "
                                  f"at least 2 steps")

    # -- encoder stage ---------------------------------------------------------------------------------------------
    def load_encoder(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.encoder_components, dtype, device)

    def _encode_one(self, model: Any, prompt: str, msl: int, what: str) -> tuple[dict[str, torch.Tensor], int]:
        text = model.prompt_template_encode.format(prompt)
        n_tokens = len(model.tokenizer(text).input_ids) - model.prompt_template_encode_start_idx
        check_tokens(n_tokens, msl, what)
        with torch.inference_mode():
            embeds, mask = model.encode_prompt(prompt=prompt, device=model._execution_device, max_sequence_length=msl)
        out = {"prompt_embeds": embeds}
        if mask is not None:
            out["prompt_embeds_mask"] = mask.to(torch.int64)
        return out, n_tokens

    def encode(self, model: Any, prompt: str, negative_prompt: str | None, max_sequence_length: int = 0) -> EncodedPrompt:
        msl = max_sequence_length or self.max_sequence_length
        conds, n_tokens = self._encode_one(model, prompt, msl, "prompt")
        negatives: dict[str, torch.Tensor] = {}
        warnings = []
        if negative_prompt:  # the pipeline runs true CFG only with a negative prompt
            negatives, _ = self._encode_one(model, negative_prompt, msl, "negative_prompt")
        elif negative_prompt is not None:
            warnings.append("no negative_prompt: Qwen-Image runs classifier-free guidance only when one is given")
        return EncodedPrompt(conds, negatives, warnings=warnings, prompt_tokens=n_tokens)

    # -- denoiser stage --------------------------------------------------------------------------------------------
    def load_denoiser(self, dtype: torch.dtype, device: torch.device, component: str = "transformer") -> Any:
        if component != "transformer":
            raise InvalidArgument(f"component={component!r}: the {self.family} family has one transformer "
                                  "('transformer')")
        pipe = load_partial_pipeline(self, self.denoiser_components, dtype, device)
        if pipe.transformer.config.guidance_embeds:
            raise InvalidArgument(f"{self.checkpoint}: guidance-distilled Qwen-Image transformers (guidance_embeds="
                                  "true) are not supported")
        pipe.vae_scale_factor = self.vae_scale_factor
        # constant across a request's steps, computed once per request in prepare: the text's input norm and
        # projection, and the rotary tables (image and text positions)
        t = pipe.transformer
        pipe.step_constants = {"txt_norm": StepConstant(t.txt_norm), "txt_in": StepConstant(t.txt_in),
                               "rope": StepConstant(t.pos_embed)}
        return pipe

    def prepare(self, model: Any, params: SamplingParams, conditionings: dict[str, torch.Tensor],
                negative_conditionings: dict[str, torch.Tensor], initial_latents: torch.Tensor | None,
                start_step: int, end_step: int) -> DenoiseState:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        transformer = model.transformer
        device, dtype = transformer.device, transformer.dtype
        width = transformer.config.joint_attention_dim
        branches = {"cond": _branch_conditioning(conditionings, width, "conditionings")}
        # QwenImagePipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt was given
        do_cfg = params.guidance_scale > 1 and bool(negative_conditionings)
        if do_cfg:
            branches["uncond"] = _branch_conditioning(negative_conditionings, width, "negative_conditionings")
        vsf = model.vae_scale_factor
        _check_text_positions(transformer, branches, params, vsf * 2)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents = model.prepare_latents(1, transformer.config.in_channels // 4, params.height, params.width, dtype,
                                        device, generator, None)
        if initial_latents is not None:
            if tuple(initial_latents.shape) != tuple(latents.shape):
                raise InvalidArgument(f"initial_latents has shape {list(initial_latents.shape)}, expected "
                                      f"{list(latents.shape)} for {params.width}x{params.height}")
            latents = initial_latents.to(device=device, dtype=dtype)
        img_shapes = [[(1, params.height // vsf // 2, params.width // vsf // 2)]]
        scheduler = self.fresh_scheduler(model.scheduler)
        sigmas = np.linspace(1.0, 1 / params.steps, params.steps)
        cfg = scheduler.config
        mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, params.steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(start_step)
        inputs = {}
        for branch, (embeds, mask) in branches.items():
            inputs[branch] = {"encoder_hidden_states": embeds.to(device=device, dtype=dtype),
                              "encoder_hidden_states_mask": None if mask is None else mask.to(device),
                              "img_shapes": img_shapes, "guidance": None, "attention_kwargs": {}}
        extras: dict[str, Any] = {}
        constants = getattr(model, "step_constants", None)
        if constants is not None:  # per branch: the text (and its length, which places the text's rotary rows)
            norm, proj, rope = constants["txt_norm"], constants["txt_in"], constants["rope"]
            per_branch = {}
            with torch.inference_mode():
                for branch, branch_inputs in inputs.items():
                    embeds = branch_inputs["encoder_hidden_states"]
                    normed = norm.compute(embeds)
                    tables = rope.compute(img_shapes, max_txt_seq_len=embeds.shape[1], device=device)
                    per_branch[branch] = [(norm, normed), (proj, proj.compute(normed)), (rope, tables)]
            extras["step_constants"] = per_branch
        return DenoiseState(latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=inputs,
                            guidance_scale=params.guidance_scale, do_cfg=do_cfg, start_step=start_step,
                            end_step=end_step, total_steps=params.steps, extras=extras)

    def forward(self, model: Any, state: DenoiseState, latents: torch.Tensor, step: int, branch: Branch) -> torch.Tensor:
        timestep = state.timesteps[step].expand(latents.shape[0]).to(latents.dtype)
        with using(served(state, branch)):
            return model.transformer(hidden_states=latents, timestep=timestep / 1000, return_dict=False,
                                     **state.branch_inputs[branch])[0]

    def combine(self, state: DenoiseState, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """QwenImagePipeline's true CFG: the mix rescaled to the conditional prediction's per-token norm."""
        comb = uncond + state.guidance_scale * (cond - uncond)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        comb_norm = torch.norm(comb, dim=-1, keepdim=True)
        return comb * (cond_norm / comb_norm)

    def install_attention(self, model: Any, ops: Any) -> int:
        from services.families.processors.qwen_image import install

        return install(model.transformer, ops)

    def sequence_parallel_plan(self, component: str = "transformer") -> SequenceParallelPlan:
        """Image tokens are sharded at the transformer's input; the text after its input norm/projection (at the
        first block, because the text length fixes the rotary positions); both rotary tables at the position
        embedder's output; the text key mask at every block (each gets the whole mask). The prediction is gathered
        at ``proj_out``. Every token is computed once per group (see ``denoiser_svc.parallel.sharding``)."""
        blocks = "transformer.transformer_blocks"
        return SequenceParallelPlan(
            splits={"transformer": (SeqSplit("hidden_states", 1, "image"),),
                    "transformer.pos_embed": (SeqSplit(0, 0, "image", on_output=True),
                                              SeqSplit(1, 0, "text", on_output=True)),
                    f"{blocks}.0": (SeqSplit("encoder_hidden_states", 1, "text"),),
                    f"{blocks}.*": (SeqSplit("encoder_hidden_states_mask", 1, "text"),
                                    SeqSplit("modulate_index", 1, "image"))},
            gathers={"transformer.proj_out": SeqGather(1, "image")},
            joint_layout=("text", "image"),
            num_heads=int(self.component_config("transformer")["num_attention_heads"]),
        )

    def cache_spec(self, component: str = "transformer") -> CacheSpec:
        """One list of double-stream blocks taking (hidden, encoder_hidden, ..., temb) and returning (encoder_hidden,
        hidden), as Flux's; per token 12 d^2 multiply-adds (attention projections + MLP) per stream plus the joint
        attention. TeaCache is not offered: no rescaling polynomial has been fitted for this family."""
        cfg = self.component_config(component)
        dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])

        def block_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = image_tokens + text_tokens
            return 24.0 * dim * dim * s + 4.0 * s * s * dim

        def attention_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = image_tokens + text_tokens
            return 8.0 * dim * dim * s + 4.0 * s * s * dim

        def tokens(state: DenoiseState) -> tuple[int, int]:
            return int(state.latents.shape[1]), int(state.branch_inputs["cond"]["encoder_hidden_states"].shape[1])

        return CacheSpec(block_lists=("transformer_blocks",), num_blocks=(int(cfg["num_layers"]),),
                         block_cost=block_cost, attention_cost=attention_cost, tokens=tokens)

    def warmup_conditionings(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        width = model.transformer.config.joint_attention_dim
        gen = torch.Generator("cpu").manual_seed(0)
        length = min(self.max_sequence_length, 64)
        return ({"prompt_embeds": torch.randn(1, length, width, generator=gen)},
                {"prompt_embeds": torch.randn(1, length // 2, width, generator=gen)})

    # -- VAE stage -------------------------------------------------------------------------------------------------
    def latent_shape(self, params: SamplingParams) -> tuple[int, ...]:
        return packed_latent_shape(params.height, params.width, self.vae_scale_factor,
                                   int(self.component_config("vae")["z_dim"]))

    def load_vae(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.vae_components, dtype, device)

    def decode(self, model: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        vae = model.vae
        vsf = model.vae_scale_factor
        check_latents(latents, packed_latent_shape(params.height, params.width, vsf, vae.config.z_dim), params)
        with torch.inference_mode():
            x = model._unpack_latents(latents.to(vae.device), params.height, params.width, vsf).to(vae.dtype)
            z = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            x = x / inv_std + mean
            image = vae.decode(x, return_dict=False)[0][:, :, 0]
            image = model.image_processor.postprocess(image, output_type="pt")
        return self.to_uint8_frames(image)
