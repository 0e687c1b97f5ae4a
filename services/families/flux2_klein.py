"""FLUX.2-klein family (Flux2KleinPipeline): Qwen3 hidden-state conditioning, 2x2-patchified latents packed into
tokens with 4-axis position ids, empirical-mu schedule, CFG only for the undistilled *base* checkpoints.

- Encoder: the pipeline's ``encode_prompt`` (Qwen3 chat template with ``enable_thinking=False``, padded to
  ``max_sequence_length``, hidden states of layers 9, 18 and 27 stacked on the feature axis) -> ``prompt_embeds``
  ``[1, L, 3 * hidden]``. The text position ids are a function of ``L`` and are rebuilt by the denoiser.
- Guidance: ``model_index.json``'s ``is_distilled`` (FLUX.2-klein-4B: true) means guidance_scale is ignored
  (``guidance_kind="none"``). Base checkpoints run CFG when ``guidance_scale > 1`` with the pipeline's fixed empty
  negative prompt: ``uncond + g * (cond - uncond)`` (a user negative prompt is ignored, with a warning).
- Denoiser: ``prepare_latents`` -> packed latents ``[1, (H/16)(W/16), 4C]`` and ids ``[1, N, 4]``; sigmas
  ``linspace(1, 1/steps, steps)`` with ``mu = compute_empirical_mu(N, steps)``; the transformer sees ``t / 1000``.
- VAE: scatter tokens back by their ids, un-normalise with the VAE's BatchNorm running statistics, unpatchify 2x2,
  decode, ``Flux2ImageProcessor.postprocess``.
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
from services.families.cache_spec import NO_TEACACHE_POLYNOMIAL, BlockCall, CacheSpec, block_counts
from services.families.loading import checkpoint_defaults, load_partial_pipeline, vae_scale_factor
from services.families.text_limits import check_tokens, tokenizer_budget

PIPELINE_MAX_SEQUENCE_LENGTH = 512
"""Flux2KleinPipeline.__call__'s default ``max_sequence_length`` (every prompt is padded to it)."""
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
"""Flux2KleinPipeline's default ``text_encoder_out_layers``."""


class Flux2KleinAdapter(FamilyAdapter):
    family = "flux2_klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    encoder_components = ("tokenizer", "text_encoder")
    denoiser_components = ("transformer", "scheduler")
    vae_components = ("vae",)
    guidance_kind = "none"
    """For the distilled checkpoints; ``limits()`` reports ``cfg`` for base (undistilled) ones."""

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def is_distilled(self) -> bool:
        return bool(self.model_index.get("is_distilled", False))

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self)

    @property
    def max_sequence_length(self) -> int:
        return tokenizer_budget(self, PIPELINE_MAX_SEQUENCE_LENGTH)

    def limits(self) -> Limits:
        defaults = checkpoint_defaults(self.checkpoint)
        multiple = self.vae_scale_factor * 2
        distilled = self.is_distilled
        return Limits(
            size_multiple=multiple, min_size=multiple, max_size=defaults.get("max_size", 2048),
            max_prompt_tokens=self.max_sequence_length, guidance_kind="none" if distilled else "cfg",
            default_steps=defaults.get("steps", 4 if distilled else 50),
            default_guidance_scale=defaults.get("guidance_scale", 1.0 if distilled else 4.0),
            default_width=defaults.get("width", 1024), default_height=defaults.get("height", 1024),
            cfg_threshold=1.0,
        )

    # -- encoder stage ---------------------------------------------------------------------------------------------
    def load_encoder(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.encoder_components, dtype, device)

    def _count_tokens(self, model: Any, prompt: str) -> int:
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False)
        return len(model.tokenizer(text).input_ids)

    def _embed(self, model: Any, prompt: str, msl: int) -> torch.Tensor:
        with torch.inference_mode():
            embeds, _ = model.encode_prompt(prompt=prompt, device=model._execution_device, max_sequence_length=msl,
                                            text_encoder_out_layers=TEXT_ENCODER_OUT_LAYERS)
        return embeds

    def encode(self, model: Any, prompt: str, negative_prompt: str | None, max_sequence_length: int = 0) -> EncodedPrompt:
        msl = max_sequence_length or self.max_sequence_length
        n_tokens = self._count_tokens(model, prompt)
        check_tokens(n_tokens, msl)
        warnings = []
        negatives = {}
        if negative_prompt is not None:  # asked for the CFG branch: the pipeline always uses ""
            if negative_prompt:
                warnings.append("negative_prompt is ignored: Flux2KleinPipeline's unconditional branch always uses "
                                "an empty prompt")
            negatives = {"prompt_embeds": self._embed(model, "", msl)}
        return EncodedPrompt({"prompt_embeds": self._embed(model, prompt, msl)}, negatives, warnings=warnings,
                             prompt_tokens=n_tokens)

    # -- denoiser stage --------------------------------------------------------------------------------------------
    def load_denoiser(self, dtype: torch.dtype, device: torch.device, component: str = "transformer") -> Any:
        if component != "transformer":
            raise InvalidArgument(f"component={component!r}: the {self.family} family has one transformer "
                                  "('transformer')")
        pipe = load_partial_pipeline(self, self.denoiser_components, dtype, device)
        pipe.vae_scale_factor = self.vae_scale_factor
        return pipe

    def prepare(self, model: Any, params: SamplingParams, conditionings: dict[str, torch.Tensor],
                negative_conditionings: dict[str, torch.Tensor], initial_latents: torch.Tensor | None,
                start_step: int, end_step: int) -> DenoiseState:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        transformer = model.transformer
        device, dtype = transformer.device, transformer.dtype
        width = transformer.config.joint_attention_dim
        do_cfg = params.guidance_scale > 1 and not self.is_distilled
        branches = {"cond": sequence_embeds(conditionings, "prompt_embeds", width, "conditionings")}
        if do_cfg:
            if not negative_conditionings:
                raise InvalidArgument("negative_conditionings are required: this FLUX.2-klein base model runs CFG "
                                      f"at guidance_scale={params.guidance_scale:g} > 1 (encode the negative branch)")
            branches["uncond"] = sequence_embeds(negative_conditionings, "prompt_embeds", width, "negative_conditionings")
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents, latent_ids = model.prepare_latents(1, transformer.config.in_channels // 4, params.height, params.width,
                                                    dtype, device, generator, None)
        if initial_latents is not None:
            if tuple(initial_latents.shape) != tuple(latents.shape):
                raise InvalidArgument(f"initial_latents has shape {list(initial_latents.shape)}, expected "
                                      f"{list(latents.shape)} for {params.width}x{params.height}")
            latents = initial_latents.to(device=device, dtype=dtype)
        scheduler = self.fresh_scheduler(model.scheduler)
        sigmas = np.linspace(1.0, 1 / params.steps, params.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=params.steps)
        timesteps, _ = retrieve_timesteps(scheduler, params.steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(start_step)
        inputs = {}
        for branch, embeds in branches.items():
            embeds = embeds.to(device=device, dtype=dtype)
            inputs[branch] = {"encoder_hidden_states": embeds, "txt_ids": model._prepare_text_ids(embeds).to(device),
                              "img_ids": latent_ids, "guidance": None}
        return DenoiseState(latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=inputs,
                            guidance_scale=params.guidance_scale, do_cfg=do_cfg, start_step=start_step,
                            end_step=end_step, total_steps=params.steps)

    def forward(self, model: Any, state: DenoiseState, latents: torch.Tensor, step: int, branch: Branch) -> torch.Tensor:
        transformer = model.transformer
        timestep = state.timesteps[step].expand(latents.shape[0]).to(latents.dtype)
        out = transformer(hidden_states=latents.to(transformer.dtype), timestep=timestep / 1000, return_dict=False,
                          **state.branch_inputs[branch])[0]
        return out[:, : latents.size(1):]

    def install_attention(self, model: Any, ops: Any) -> int:
        from services.families.processors.flux2_klein import install

        return install(model.transformer, ops)

    def sequence_parallel_plan(self, component: str = "transformer") -> SequenceParallelPlan:
        """Image and text tokens are both sharded at the transformer's input, with their position ids (so each rank
        computes the rotary table of its own tokens, and the transformer's text/image split of the single-stream
        sequence uses the local text length); the prediction is gathered at ``proj_out``. Every token is computed
        once per group (see ``denoiser_svc.parallel.sharding``)."""
        return SequenceParallelPlan(
            splits={"transformer": (SeqSplit("hidden_states", 1, "image"), SeqSplit("img_ids", 1, "image"),
                                    SeqSplit("encoder_hidden_states", 1, "text"), SeqSplit("txt_ids", 1, "text"))},
            gathers={"transformer.proj_out": SeqGather(1, "image")},
            joint_layout=("text", "image"),
            num_heads=int(self.component_config("transformer")["num_attention_heads"]),
        )

    def cache_spec(self, component: str = "transformer") -> CacheSpec | None:
        """Double-stream blocks take (hidden, encoder_hidden, temb_mod_img, ...) and return (encoder_hidden, hidden);
        single-stream blocks take the joint ``[text; image]`` sequence the transformer concatenates (their text
        argument is None) and return it (``BlockCall(joint=True)``). Per token a block of either kind costs
        ``(4 + 3 m) d^2`` multiply-adds (attention projections, SwiGLU MLP of ratio m; fused in the single-stream
        blocks) plus the joint attention. The single-stream blocks' attention module is fused with their MLP, so
        PAB broadcasts both there (as hooks on diffusers' attention modules would). TeaCache is refused: no fitted
        rescaling polynomial (``NO_TEACACHE_POLYNOMIAL``)."""
        cfg = self.component_config(component)
        dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        per_token = 2.0 * (4.0 + 3.0 * float(cfg.get("mlp_ratio", 3.0))) * dim * dim
        counts = block_counts(cfg, ("num_layers", "num_single_layers"))
        if counts[0] == 0:  # the joint sequence's text length comes from the double-stream blocks
            return None

        def block_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = image_tokens + text_tokens
            return per_token * s + 4.0 * s * s * dim

        def attention_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = image_tokens + text_tokens
            return (8.0 * dim * dim * s + 4.0 * s * s * dim) if block_list == 0 else block_cost(1, image_tokens,
                                                                                               text_tokens)

        def tokens(state: DenoiseState) -> tuple[int, int]:
            return int(state.latents.shape[1]), int(state.branch_inputs["cond"]["encoder_hidden_states"].shape[1])

        return CacheSpec(block_lists=("transformer_blocks", "single_transformer_blocks"), num_blocks=counts,
                         temb_arg="temb_mod_img",
                         list_calls=(None, BlockCall(temb_arg="temb_mod", context_arg=None, output=("hidden",),
                                                     joint=True)),
                         block_cost=block_cost, attention_cost=attention_cost, tokens=tokens,
                         unsupported={"teacache": NO_TEACACHE_POLYNOMIAL})

    def warmup_conditionings(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        width = model.transformer.config.joint_attention_dim
        gen = torch.Generator("cpu").manual_seed(0)
        cond = {"prompt_embeds": torch.randn(1, self.max_sequence_length, width, generator=gen)}
        uncond = {} if self.is_distilled else {"prompt_embeds": torch.randn(1, self.max_sequence_length, width,
                                                                            generator=gen)}
        return cond, uncond

    # -- VAE stage -------------------------------------------------------------------------------------------------
    def latent_shape(self, params: SamplingParams) -> tuple[int, ...]:
        return packed_latent_shape(params.height, params.width, self.vae_scale_factor,
                                   int(self.component_config("vae")["latent_channels"]))

    def load_vae(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.vae_components, dtype, device)

    def decode(self, model: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        vae = model.vae
        grid = model.vae_scale_factor * 2
        h_tokens, w_tokens = params.height // grid, params.width // grid
        channels = vae.bn.num_features  # the 2x2-patchified latent channels
        check_latents(latents, (1, h_tokens * w_tokens, channels), params)
        with torch.inference_mode():
            x = latents.to(device=vae.device, dtype=vae.dtype)
            ids = model._prepare_latent_ids(x.new_empty(x.shape[0], channels, h_tokens, w_tokens)).to(x.device)
            x = model._unpack_latents_with_ids(x, ids, h_tokens, w_tokens)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
            x = model._unpatchify_latents(x * std + mean)
            image = vae.decode(x, return_dict=False)[0]
            image = model.image_processor.postprocess(image, output_type="pt")
        return self.to_uint8_frames(image)
