"""Flux.1 family (FluxPipeline): CLIP pooled + T5 sequence conditioning, packed 2x2 latents.

Guidance follows the checkpoint's transformer: with ``guidance_embeds`` (Flux.1-dev) the scale is a transformer input
(``distilled``); without (Flux.1-schnell, the trained demo model ``chitu-shapes-flux``) it is FluxPipeline's true
CFG (``cfg``): ``guidance_scale`` is the pipeline's ``true_cfg_scale``, the negative prompt defaults to "", and both
branches run when the scale is above 1, mixed as ``uncond + scale * (cond - uncond)``.
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
from services.families.cache_spec import CacheSpec, block_counts
from services.families.loading import checkpoint_defaults, load_partial_pipeline, vae_scale_factor
from services.families.step_constants import StepConstant, StepTable, served, using
from services.families.text_limits import tokenizer_budget


class FluxAdapter(FamilyAdapter):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    encoder_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    denoiser_components = ("transformer", "scheduler")
    vae_components = ("vae",)
    guidance_kind = "distilled"
    cfg_threshold = 1.0
    """True CFG runs above this scale (FluxPipeline: ``true_cfg_scale > 1`` with a negative prompt, "" included)."""

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self)

    @property
    def max_sequence_length(self) -> int:
        """T5 token budget: the tokenizer's model_max_length, capped at the pipeline's 512."""
        return tokenizer_budget(self, 512, component="tokenizer_2")

    @property
    def distilled(self) -> bool:
        """Whether the transformer embeds the guidance scale (else the checkpoint serves with true CFG)."""
        return bool(self.component_config("transformer").get("guidance_embeds"))

    def limits(self) -> Limits:
        defaults = checkpoint_defaults(self.checkpoint)
        multiple = self.vae_scale_factor * 2
        distilled = self.distilled
        return Limits(
            size_multiple=multiple, min_size=multiple, max_size=defaults.get("max_size", 2048),
            max_prompt_tokens=self.max_sequence_length, guidance_kind="distilled" if distilled else "cfg",
            default_steps=defaults.get("steps", 28),
            # the pipeline's defaults: guidance_scale=3.5 (distilled), true_cfg_scale=1.0 (no CFG)
            default_guidance_scale=defaults.get("guidance_scale", 3.5 if distilled else 1.0),
            default_width=defaults.get("width", 1024), default_height=defaults.get("height", 1024),
            cfg_threshold=self.cfg_threshold, cfg_needs_negative_prompt=False,
        )

    # -- encoder stage ---------------------------------------------------------------------------------------------
    def load_encoder(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.encoder_components, dtype, device)

    def encode(self, model: Any, prompt: str, negative_prompt: str | None, max_sequence_length: int = 0) -> EncodedPrompt:
        msl = max_sequence_length or self.max_sequence_length
        n_tokens = len(model.tokenizer_2(prompt).input_ids)
        if n_tokens > msl:
            raise InvalidArgument(f"prompt is {n_tokens} tokens long; the limit of this model is {msl} tokens")
        warnings = []
        clip_tokens = len(model.tokenizer(prompt).input_ids)
        if clip_tokens > model.tokenizer_max_length:
            warnings.append(f"prompt has {clip_tokens} CLIP tokens; the pooled embedding uses the first "
                            f"{model.tokenizer_max_length}")
        negatives: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            prompt_embeds, pooled, _ = model.encode_prompt(prompt=prompt, prompt_2=None, device=model._execution_device,
                                                           max_sequence_length=msl)
            if negative_prompt is not None:  # the true-CFG branch, encoded as FluxPipeline encodes negative_prompt
                neg_tokens = len(model.tokenizer_2(negative_prompt).input_ids)
                if neg_tokens > msl:
                    raise InvalidArgument(f"negative_prompt is {neg_tokens} tokens long; the limit of this model is "
                                          f"{msl} tokens")
                neg_embeds, neg_pooled, _ = model.encode_prompt(prompt=negative_prompt, prompt_2=None,
                                                                device=model._execution_device, max_sequence_length=msl)
                negatives = {"prompt_embeds": neg_embeds, "pooled_prompt_embeds": neg_pooled}
        return EncodedPrompt({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}, negatives,
                             warnings=warnings, prompt_tokens=n_tokens)

    # -- denoiser stage --------------------------------------------------------------------------------------------
    def load_denoiser(self, dtype: torch.dtype, device: torch.device, component: str = "transformer") -> Any:
        if component != "transformer":
            raise InvalidArgument(f"component={component!r}: the flux family has one transformer ('transformer')")
        pipe = load_partial_pipeline(self, self.denoiser_components, dtype, device)
        return self.denoiser_handle(pipe)

    def denoiser_handle(self, pipe: Any) -> Any:
        """Finish a partial FluxPipeline (transformer + scheduler) as the denoiser handle ``prepare`` takes; also used
        by benchmarks on real-size random-weight transformers built in memory."""
        pipe.vae_scale_factor = self.vae_scale_factor
        # constant across steps, computed once per request in prepare: rotary embedding and text context embedding
        pipe.step_constants = {"rope": StepConstant(pipe.transformer.pos_embed),
                               "context": StepConstant(pipe.transformer.context_embedder)}
        # known for every step in advance, computed for all of a request's steps at once in prepare: the time/guidance/
        # pooled-text embedding and every block's AdaLN modulation projection (27 % of Flux.1-dev's weights)
        t = pipe.transformer
        pipe.step_table = StepTable(t.time_text_embed, [
            *(m for blk in t.transformer_blocks for m in (blk.norm1.linear, blk.norm1_context.linear)),
            *(blk.norm.linear for blk in t.single_transformer_blocks), t.norm_out.linear])
        return pipe

    def prepare(self, model: Any, params: SamplingParams, conditionings: dict[str, torch.Tensor],
                negative_conditionings: dict[str, torch.Tensor], initial_latents: torch.Tensor | None,
                start_step: int, end_step: int) -> DenoiseState:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        transformer = model.transformer
        device, dtype = transformer.device, transformer.dtype
        do_cfg = not transformer.config.guidance_embeds and params.guidance_scale > self.cfg_threshold
        if do_cfg and not negative_conditionings:
            raise InvalidArgument(f"negative_conditionings are required: this Flux checkpoint runs true CFG at "
                                  f"guidance_scale={params.guidance_scale:g} > {self.cfg_threshold:g} (encode the "
                                  f"negative prompt, \"\" by default)")
        widths = (transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim)
        texts = {"cond": _text_inputs(conditionings, "conditionings", widths, device, dtype)}
        if do_cfg:
            texts["uncond"] = _text_inputs(negative_conditionings, "negative_conditionings", widths, device, dtype)
            if texts["uncond"][0].shape[1] != texts["cond"][0].shape[1]:
                raise InvalidArgument(f"negative_conditionings' prompt_embeds have {texts['uncond'][0].shape[1]} "
                                      f"tokens, the prompt's {texts['cond'][0].shape[1]}: encode both with one "
                                      f"max_sequence_length")
        prompt_embeds, pooled, text_ids = texts["cond"]
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents, image_ids = model.prepare_latents(1, transformer.config.in_channels // 4, params.height, params.width,
                                                   prompt_embeds.dtype, device, generator, None)
        if initial_latents is not None:
            if tuple(initial_latents.shape) != tuple(latents.shape):
                raise InvalidArgument(f"initial_latents has shape {list(initial_latents.shape)}, expected "
                                      f"{list(latents.shape)} for {params.width}x{params.height}")
            latents = initial_latents.to(device=device, dtype=dtype)
        scheduler = self.fresh_scheduler(model.scheduler)
        sigmas = np.linspace(1.0, 1 / params.steps, params.steps)
        cfg = scheduler.config
        mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, params.steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(start_step)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], params.guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])
        inputs = {branch: {"guidance": guidance, "pooled_projections": pool, "encoder_hidden_states": embeds,
                           "txt_ids": ids, "img_ids": image_ids} for branch, (embeds, pool, ids) in texts.items()}
        extras = {}
        constants = getattr(model, "step_constants", None)
        if constants is not None:  # per branch: the text context differs, the rotary table is shared
            with torch.inference_mode():
                rope = constants["rope"].compute(torch.cat((text_ids, image_ids), dim=0))
                extras["step_constants"] = {
                    branch: [(constants["rope"], rope), (constants["context"], constants["context"].compute(embeds))]
                    for branch, (embeds, _, _) in texts.items()}
        table = getattr(model, "step_table", None)
        if table is not None:  # the forward's own arithmetic on the timestep and guidance, for all steps at once
            n = end_step - start_step
            with torch.inference_mode():
                args = [(timesteps[start_step:end_step].to(dtype) / 1000).to(dtype) * 1000]
                if guidance is not None:
                    args.append(torch.full([n], params.guidance_scale, device=device, dtype=torch.float32).to(dtype)
                                * 1000)
                extras["step_tables"] = {branch: table.compute(*args, pool.expand(n, -1))
                                         for branch, (_, pool, _) in texts.items()}
        return DenoiseState(latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=inputs,
                            guidance_scale=params.guidance_scale, do_cfg=do_cfg, start_step=start_step,
                            end_step=end_step, total_steps=params.steps, extras=extras)

    def install_attention(self, model: Any, ops: Any) -> int:
        from services.families.processors.flux import install

        return install(model.transformer, ops)

    def sequence_parallel_plan(self, component: str = "transformer") -> SequenceParallelPlan:
        """Image and text tokens are both sharded (each token computed once per group, see
        ``denoiser_svc.parallel.sharding``). Text is split at the context embedder's output and the rotary table at
        the position embedder's output (text then image rows), so values precomputed once per request from the whole
        sequence (``step_constants``) are sharded the same way; the prediction is gathered at ``proj_out``."""
        text_then_image = ("text", "image")
        return SequenceParallelPlan(
            splits={
                "transformer": (SeqSplit("hidden_states", 1, "image"),),
                "transformer.context_embedder": (SeqSplit(0, 1, "text", on_output=True),),
                "transformer.pos_embed": (SeqSplit(0, 0, text_then_image, on_output=True),
                                          SeqSplit(1, 0, text_then_image, on_output=True)),
            },
            gathers={"transformer.proj_out": SeqGather(1, "image")},
            joint_layout=text_then_image,
            num_heads=int(self.component_config("transformer")["num_attention_heads"]),
        )

    def cache_spec(self, component: str = "transformer") -> CacheSpec:
        """Double-stream blocks, then single-stream blocks; both take (hidden, encoder_hidden, temb) and return
        (encoder_hidden, hidden). Per token both cost 12 d^2 multiply-adds (attention projections + MLP) plus the
        joint attention over all tokens; the attention module is the projections (8 d^2 / 6 d^2 FLOPs) + SDPA."""
        cfg = self.component_config(component)
        dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])

        def block_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = image_tokens + text_tokens
            return 24.0 * dim * dim * s + 4.0 * s * s * dim

        def attention_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = image_tokens + text_tokens
            return (8.0 if block_list == 0 else 6.0) * dim * dim * s + 4.0 * s * s * dim

        return CacheSpec(block_lists=("transformer_blocks", "single_transformer_blocks"),
                         num_blocks=block_counts(cfg, ("num_layers", "num_single_layers")), transformer=component,
                         modulated_input=_flux_modulated_input, teacache_coefficients=FLUX_TEACACHE_COEFFICIENTS,
                         block_cost=block_cost, attention_cost=attention_cost, tokens=_flux_tokens)

    def warmup_conditionings(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        cfg = model.transformer.config
        gen = torch.Generator("cpu").manual_seed(0)

        def conds() -> dict[str, torch.Tensor]:
            return {"prompt_embeds": torch.randn(1, self.max_sequence_length, cfg.joint_attention_dim, generator=gen),
                    "pooled_prompt_embeds": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}

        return conds(), ({} if cfg.guidance_embeds else conds())

    def forward(self, model: Any, state: DenoiseState, latents: torch.Tensor, step: int, branch: Branch) -> torch.Tensor:
        # no host-device synchronisation: the timestep is indexed on the device, constants come from prepare
        timestep = state.timesteps[step].expand(latents.shape[0]).to(latents.dtype)
        pairs = served(state, branch)
        tables = state.extras.get("step_tables", {}).get(branch)
        if tables is not None and state.start_step <= step < state.end_step:
            pairs = [*pairs, *tables.rows(step - state.start_step, latents.shape[0])]
        with using(pairs):
            return model.transformer(hidden_states=latents, timestep=timestep / 1000, return_dict=False,
                                     **state.branch_inputs[branch])[0]

    # -- VAE stage -------------------------------------------------------------------------------------------------
    def latent_shape(self, params: SamplingParams) -> tuple[int, ...]:
        return packed_latent_shape(params.height, params.width, self.vae_scale_factor,
                                   int(self.component_config("vae")["latent_channels"]))

    def load_vae(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.vae_components, dtype, device)

    def decode(self, model: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        vae = model.vae
        check_latents(latents, packed_latent_shape(params.height, params.width, model.vae_scale_factor,
                                                   vae.config.latent_channels), params)
        with torch.inference_mode():
            x = model._unpack_latents(latents.to(device=vae.device, dtype=vae.dtype), params.height, params.width,
                                      model.vae_scale_factor)
            x = x / vae.config.scaling_factor + vae.config.shift_factor
            image = vae.decode(x, return_dict=False)[0]
            image = model.image_processor.postprocess(image, output_type="pt")
        return self.to_uint8_frames(image)


FLUX_TEACACHE_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
"""TeaCache's rescaling polynomial for FLUX.1-dev (fitted by the TeaCache authors, TeaCache4FLUX)."""


def _text_inputs(named: dict[str, torch.Tensor], field: str, widths: tuple[int, int], device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds, text_ids) of one branch, on the transformer's device and dtype;
    INVALID_ARGUMENT naming the field when one is missing or not one prompt's [1, L, joint_attention_dim] /
    [1, pooled_projection_dim] (``widths``, from the transformer's config)."""
    seq_width, pooled_width = widths
    embeds = sequence_embeds(named, "prompt_embeds", seq_width, field)
    pooled = named.get("pooled_prompt_embeds")
    if pooled is None:
        raise InvalidArgument(f"{field} lacks 'pooled_prompt_embeds' (got {sorted(named)})")
    if tuple(pooled.shape) != (1, pooled_width):
        raise InvalidArgument(f"{field}['pooled_prompt_embeds'] has shape {list(pooled.shape)}; expected "
                              f"[1, {pooled_width}]")
    embeds = embeds.to(device=device, dtype=dtype)
    return (embeds, pooled.to(device=device, dtype=dtype), torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype))


def _flux_modulated_input(block: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The image stream after the first double block's AdaLN-Zero modulation (what its attention sees)."""
    return block.norm1(hidden, emb=temb)[0]


def _flux_tokens(state: DenoiseState) -> tuple[int, int]:
    return int(state.latents.shape[1]), int(state.branch_inputs["cond"]["encoder_hidden_states"].shape[1])
