"""Z-Image family (ZImagePipeline): Qwen3 second-to-last hidden states of variable length, unpacked float32
latents, CFG from ``guidance_scale > 0`` with the pipeline's ``pos + g * (pos - neg)`` and a negated velocity.

- Encoder: the pipeline's ``encode_prompt`` (Qwen3 chat template with thinking enabled, padded to
  ``max_sequence_length``, ``hidden_states[-2]`` at the valid positions only) -> ``prompt_embeds`` ``[1, L, 2560]``
  (the pipeline's list of one ``[L, 2560]`` tensor, batch size 1, so no mask is needed). When CFG runs the negative
  prompt is encoded the same way (``""`` when none is given, as the pipeline does).
- Guidance: ZImagePipeline's ``do_classifier_free_guidance`` is ``guidance_scale > 0`` (Z-Image-Turbo runs with 0);
  the mix is ``pos + g * (pos - neg)`` in float32. ``cfg_normalization`` and ``cfg_truncation`` stay at the
  pipeline's defaults (off; truncation 1.0 never triggers).
- Denoiser: ``prepare_latents`` in float32 ``[1, C, H/8, W/8]``; sigmas ``linspace(1, 1/steps, steps)`` with
  ``mu = calculate_shift((H/16)(W/16), ...)`` (ignored by Turbo's static-shift scheduler); the transformer takes lists
  (``[C, 1, H/8, W/8]`` latents, ``[L, D]`` captions) and ``(1000 - t) / 1000``; the scheduler steps with the negated
  prediction.
- VAE: ``x / scaling_factor + shift_factor``, decode, ``VaeImageProcessor.postprocess``.

The pipeline runs both CFG branches as one batch of two (padded to the longer caption and masked); here each
branch is its own batch of one, which is the same math with a different summation order (agreement to float32
rounding, not bitwise; see tests/e2e/test_family_z_image.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    check_latents,
    sequence_embeds,
)
from services.families.cache_spec import NO_TEACACHE_POLYNOMIAL, CacheSpec
from services.families.loading import checkpoint_defaults, load_partial_pipeline, vae_scale_factor
from services.families.text_limits import check_tokens, tokenizer_budget

PIPELINE_MAX_SEQUENCE_LENGTH = 512
"""ZImagePipeline.__call__'s default ``max_sequence_length``."""
SEQ_MULTIPLE = 32
"""ZImageTransformer2DModel pads the image and the caption sequences to multiples of this (``SEQ_MULTI_OF``)."""


def _check_text_positions(transformer: Any, branches: dict[str, torch.Tensor]) -> None:
    """Z-Image numbers the caption's tokens 1.. along the rotary table's first axis (padded to a multiple of 32) and
    puts the image after them: the padded caption and the image's index must fit the table (``axes_lens[0]``), or the
    forward fails on an out-of-range index (INTERNAL). Only prompts far longer than the encoder's budget get here."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    table = transformer.config.axes_lens[0]
    limit = (table - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF  # padded length + 1 (the image's index) < table
    for branch, embeds in branches.items():
        if embeds.shape[1] > limit:
            where = "conditionings" if branch == "cond" else "negative_conditionings"
            raise InvalidArgument(f"{where}['prompt_embeds'] has {embeds.shape[1]} tokens; at most {limit} fit this "
                                  f"model's rotary table ({table} positions)")


class ZImageAdapter(FamilyAdapter):
    family = "z_image"
    pipeline_classes = ("ZImagePipeline",)
    encoder_components = ("tokenizer", "text_encoder")
    denoiser_components = ("transformer", "scheduler")
    vae_components = ("vae",)
    guidance_kind = "cfg"

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self)

    @property
    def max_sequence_length(self) -> int:
        return tokenizer_budget(self, PIPELINE_MAX_SEQUENCE_LENGTH)

    def limits(self) -> Limits:
        defaults = checkpoint_defaults(self.checkpoint)
        multiple = self.vae_scale_factor * 2
        return Limits(
            size_multiple=multiple, min_size=multiple, max_size=defaults.get("max_size", 2048),
            max_prompt_tokens=self.max_sequence_length, guidance_kind="cfg",
            default_steps=defaults.get("steps", 50), default_guidance_scale=defaults.get("guidance_scale", 5.0),
            default_width=defaults.get("width", 1024), default_height=defaults.get("height", 1024),
            cfg_threshold=0.0,
        )

    # -- encoder stage ---------------------------------------------------------------------------------------------
    def load_encoder(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.encoder_components, dtype, device)

    def _count_tokens(self, model: Any, prompt: str) -> int:
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True)
        return len(model.tokenizer(text).input_ids)

    def encode(self, model: Any, prompt: str, negative_prompt: str | None, max_sequence_length: int = 0) -> EncodedPrompt:
        msl = max_sequence_length or self.max_sequence_length
        n_tokens = self._count_tokens(model, prompt)
        check_tokens(n_tokens, msl)
        if negative_prompt:
            check_tokens(self._count_tokens(model, negative_prompt), msl, "negative_prompt")
        do_cfg = negative_prompt is not None
        with torch.inference_mode():
            embeds, negative = model.encode_prompt(prompt=prompt, device=model._execution_device,
                                                   do_classifier_free_guidance=do_cfg,
                                                   negative_prompt=negative_prompt or None, max_sequence_length=msl)
        negatives = {"prompt_embeds": negative[0].unsqueeze(0)} if do_cfg else {}
        return EncodedPrompt({"prompt_embeds": embeds[0].unsqueeze(0)}, negatives, prompt_tokens=n_tokens)

    # -- denoiser stage --------------------------------------------------------------------------------------------
    def load_denoiser(self, dtype: torch.dtype, device: torch.device, component: str = "transformer") -> Any:
        if component != "transformer":
            raise InvalidArgument(f"component={component!r}: the {self.family} family has one transformer "
                                  "('transformer')")
        pipe = load_partial_pipeline(self, self.denoiser_components, dtype, device)
        pipe.vae_scale_factor = self.vae_scale_factor
        if len(pipe.transformer.context_refiner):
            pipe.context_refiner_cache = ContextRefinerCache(pipe.transformer)
        return pipe

    def prepare(self, model: Any, params: SamplingParams, conditionings: dict[str, torch.Tensor],
                negative_conditionings: dict[str, torch.Tensor], initial_latents: torch.Tensor | None,
                start_step: int, end_step: int) -> DenoiseState:
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        transformer = model.transformer
        device, dtype = transformer.device, transformer.dtype
        width = transformer.config.cap_feat_dim
        branches = {"cond": sequence_embeds(conditionings, "prompt_embeds", width, "conditionings")}
        do_cfg = params.guidance_scale > 0  # ZImagePipeline.do_classifier_free_guidance
        if do_cfg:
            if not negative_conditionings:
                raise InvalidArgument("negative_conditionings are required: Z-Image runs CFG whenever guidance_scale "
                                      f"> 0 (got {params.guidance_scale:g}); encode the negative prompt ('' by default)")
            branches["uncond"] = sequence_embeds(negative_conditionings, "prompt_embeds", width,
                                                 "negative_conditionings")
        _check_text_positions(transformer, branches)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents = model.prepare_latents(1, transformer.in_channels, params.height, params.width, torch.float32, device,
                                        generator, None)
        if initial_latents is not None:
            if tuple(initial_latents.shape) != tuple(latents.shape):
                raise InvalidArgument(f"initial_latents has shape {list(initial_latents.shape)}, expected "
                                      f"{list(latents.shape)} for {params.width}x{params.height}")
            latents = initial_latents.to(device=device, dtype=torch.float32)
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        scheduler = self.fresh_scheduler(model.scheduler)
        cfg = scheduler.config
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, params.steps, device, sigmas=get_default_z_image_sigmas(params.steps),
                                          mu=mu)
        scheduler.set_begin_index(start_step)
        inputs = {b: {"cap_feats": [embeds[0].to(device=device, dtype=dtype)]} for b, embeds in branches.items()}
        return DenoiseState(latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=inputs,
                            guidance_scale=params.guidance_scale, do_cfg=do_cfg, start_step=start_step,
                            end_step=end_step, total_steps=params.steps)

    def forward(self, model: Any, state: DenoiseState, latents: torch.Tensor, step: int, branch: Branch) -> torch.Tensor:
        """The transformer's raw prediction ``[1, C, 1, H, W]`` in float32 (the sign flip is in ``scheduler_step``)."""
        transformer = model.transformer
        timestep = (1000 - state.timesteps[step].expand(latents.shape[0])) / 1000
        x = list(latents.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
        refiner = getattr(model, "context_refiner_cache", None)
        served = refiner.serve(state.extras.setdefault("refined_context", {}), branch) if refiner is not None \
            else contextlib.nullcontext()
        with served:
            out = transformer(x, timestep, state.branch_inputs[branch]["cap_feats"], return_dict=False)[0]
        return torch.stack([o.float() for o in out], dim=0)

    def combine(self, state: DenoiseState, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """ZImagePipeline's CFG: ``pos + g * (pos - neg)`` (not ``neg + g * (pos - neg)``)."""
        return cond + state.guidance_scale * (cond - uncond)

    def scheduler_step(self, state: DenoiseState, noise_pred: torch.Tensor, step: int) -> torch.Tensor:
        noise_pred = -noise_pred.squeeze(2)
        return state.scheduler.step(noise_pred.to(torch.float32), state.timesteps[step], state.latents,
                                    return_dict=False)[0]

    def install_attention(self, model: Any, ops: Any) -> int:
        from services.families.processors.z_image import install

        return install(model.transformer, ops)

    def sequence_parallel_plan(self, component: str = "transformer") -> SequenceParallelPlan:
        """The main blocks run sharded: the transformer builds their image + caption sequence (each part padded to a
        multiple of 32 with its pad token) inside its forward, so it is split where the first main block receives it,
        with the rotary table and key mask at every main block (each gets them whole); the output is gathered at the
        final layer, before unpatchify. The refiners before it (a few blocks) run whole on every rank: their joint
        attention happens before any split, so the sequence-parallel wrapper runs it locally. Every main-block token
        is computed once per group."""
        layers = "transformer.layers"
        return SequenceParallelPlan(
            splits={f"{layers}.0": (SeqSplit(0, 1, "unified"),),
                    f"{layers}.*": (SeqSplit(1, 1, "unified"), SeqSplit(2, 1, "unified"), SeqSplit(4, 1, "unified"))},
            gathers={"transformer.all_final_layer.*": SeqGather(1, "unified")},
            joint_layout=("unified",),
            num_heads=int(self.component_config("transformer")["n_heads"]),
        )

    def cache_spec(self, component: str = "transformer") -> CacheSpec:
        """The main blocks (``layers``) take the unified sequence ``x`` (image tokens padded to a multiple of 32, then
        the caption padded likewise; sharded under sequence parallelism), the attention mask, the rotary table and
        ``adaln_input``, and return the sequence. The caches work on the main blocks only: the refiners (a few
        blocks on the image and the caption apart, before the sequence is built and split) always run, and the
        skipped fractions are of the main blocks' compute. Decision metrics read the image tokens, the first
        ``(H/2)(W/2)`` of the sequence (``tokens``), which leaves out the pad and caption tokens and, on every rank,
        the sequence-parallel padding. Per token a main block costs 4 d^2 (attention projections) + 3 d f (SwiGLU
        FFN, f = 8d/3) multiply-adds plus the attention. TeaCache is refused: no fitted rescaling polynomial
        (``NO_TEACACHE_POLYNOMIAL``)."""
        cfg = self.component_config(component)
        dim = int(cfg["dim"])
        ffn = int(dim / 3 * 8)
        patch = int(cfg.get("all_patch_size", (2,))[0])

        def padded(n: int) -> int:
            return n + (-n) % SEQ_MULTIPLE

        def block_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = padded(image_tokens) + padded(text_tokens)
            return 2.0 * (4 * dim * dim + 3 * dim * ffn) * s + 4.0 * s * s * dim

        def attention_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
            s = padded(image_tokens) + padded(text_tokens)
            return 8.0 * dim * dim * s + 4.0 * s * s * dim

        def tokens(state: DenoiseState) -> tuple[int, int]:
            h, w = state.latents.shape[-2:]
            return (h // patch) * (w // patch), int(state.branch_inputs["cond"]["cap_feats"][0].shape[0])

        return CacheSpec(block_lists=("layers",), num_blocks=(int(cfg["n_layers"]),), hidden_arg="x", context_arg=None,
                         temb_arg="adaln_input", block_output=("hidden",), attention="attention",
                         block_cost=block_cost, attention_cost=attention_cost, tokens=tokens,
                         unsupported={"teacache": NO_TEACACHE_POLYNOMIAL})

    def warmup_conditionings(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        width = model.transformer.config.cap_feat_dim
        gen = torch.Generator("cpu").manual_seed(0)
        length = min(self.max_sequence_length, 64)
        uncond = {"prompt_embeds": torch.randn(1, length // 2, width, generator=gen)}
        return {"prompt_embeds": torch.randn(1, length, width, generator=gen)}, uncond

    # -- VAE stage -------------------------------------------------------------------------------------------------
    def latent_shape(self, params: SamplingParams) -> tuple[int, ...]:
        """``[1, C, H/s, W/s]`` (``s``: the VAE's scale factor, the size rounded down to a multiple of 2s)."""
        grid = self.vae_scale_factor * 2
        return (1, int(self.component_config("vae")["latent_channels"]), 2 * (params.height // grid),
                2 * (params.width // grid))

    def load_vae(self, dtype: torch.dtype, device: torch.device) -> Any:
        return load_partial_pipeline(self, self.vae_components, dtype, device)

    def decode(self, model: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        vae = model.vae
        vsf = model.vae_scale_factor
        check_latents(latents, (1, vae.config.latent_channels, params.height // vsf, params.width // vsf), params)
        with torch.inference_mode():
            x = latents.to(device=vae.device, dtype=vae.dtype)
            x = x / vae.config.scaling_factor + vae.config.shift_factor
            image = vae.decode(x, return_dict=False)[0]
            image = model.image_processor.postprocess(image, output_type="pt")
        return self.to_uint8_frames(image)


class ContextRefinerCache:
    """Z-Image's context refiner: transformer blocks without timestep modulation over the caption tokens (two in
    Z-Image-Turbo), so their output is the same at every step of a request. It is computed on a request's first step
    (per CFG branch: a forward hook on the last refiner block keeps a copy) and served on the others, where the
    refiner blocks are replaced, for that forward only, by one module that returns the kept output. The transformer's
    own code runs unchanged around it (caption embedding, padding, rotary tables, the unified sequence), and the
    result is bit-identical: the same blocks computed the value from the same inputs. Real size (30 main + 2 noise +
    2 context blocks, caption padded to 512 tokens) that is ~0.7 % of a step's FLOPs, at small-GEMM efficiency.

    The copy matters: under CUDA graphs a compiled block's output lives in the graph's memory pool and the next
    replay of that graph (another request's first step) would overwrite it."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self._sink: list[torch.Tensor] | None = None
        transformer.context_refiner[-1].register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._sink is not None:
            self._sink.append(output.clone())

    @contextlib.contextmanager
    def serve(self, kept: dict[str, torch.Tensor], branch: str) -> Iterator[None]:
        """Around one forward of ``branch``: keep the refiner's output in ``kept`` (the request's, per branch) the
        first time, serve it afterwards."""
        t = self.transformer
        if branch in kept:
            layers = t.context_refiner
            t.context_refiner = torch.nn.ModuleList([_KeptOutput(kept[branch])])
            try:
                yield
            finally:
                t.context_refiner = layers
            return
        sink: list[torch.Tensor] = []
        self._sink = sink
        try:
            yield
        finally:
            self._sink = None
        if sink:
            kept[branch] = sink[-1]


class _KeptOutput(torch.nn.Module):
    """Stands in for the context refiner blocks: returns their kept output (the caption sequence's shape cannot
    change within a request; checked)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, cap_feats: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if cap_feats.shape != self.value.shape:
            raise RuntimeError(f"the kept context refiner output has shape {list(self.value.shape)}, this forward's "
                               f"caption sequence {list(cap_feats.shape)}")
        return self.value
