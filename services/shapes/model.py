"""The demo model ``chitu-shapes-flux``: the Flux.1 architecture at toy scale, its components, text encoding as
FluxPipeline does it, training-run state files and the export to a diffusers folder.

Shared by ``scripts/train_shapes.py`` (GPU training), ``scripts/shapes_release.py`` (export and evaluation here)
and the tests (a randomly initialised model of the same architecture stands in until trained weights exist).

Sizes (``PRESETS["demo"]``): AutoencoderKL (1.3 M parameters) with 8 latent channels and 8x downsampling
(128x128 -> 16x16x8, 64 tokens of 32 channels after 2x2 packing); FluxTransformer2DModel with 2 double-stream + 4 single-stream blocks, 4 heads of
64 (about 9 M parameters), no guidance embedding (true CFG); CLIP (64 wide, 2 layers) for the pooled vector and T5
(128 wide, 2 layers) for the sequence, both 32 tokens long.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_NAME = "chitu-shapes-flux"
CHECKPOINT_DIR = REPO_ROOT / "services" / "checkpoints" / CHECKPOINT_NAME
"""Where the trained checkpoint lives in the repo (the embedded default model once it exists)."""
SERVING_DEFAULTS: dict[str, Any] = {"width": 128, "height": 128, "steps": 20, "guidance_scale": 4.0, "max_size": 512}
"""chitu.json of the demo model (``guidance_scale`` is the true-CFG scale; the release script may set it from
the training run's validation sweep)."""
MAX_SHARD = "15MB"
MAX_FILE_BYTES = 15 * 10**6
MAX_FOLDER_BYTES = 30 * 10**6


@dataclass(frozen=True)
class ShapesFluxConfig:
    """Sizes of the demo model's components."""

    latent_channels: int = 8
    vae_widths: tuple[int, ...] = (32, 64, 64, 64)
    """Four blocks: 8x downsampling, as Flux.1's VAE."""
    vae_norm_groups: int = 16
    heads: int = 4
    head_dim: int = 64
    double_layers: int = 2
    single_layers: int = 4
    rope_axes: tuple[int, int, int] = (16, 24, 24)
    """Rotary dimensions per (text, row, column) axis; they sum to head_dim."""
    clip_hidden: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    t5_dim: int = 128
    t5_layers: int = 2
    t5_heads: int = 4
    max_tokens: int = 32
    """Tokens of both tokenizers (model_max_length; the serving max_sequence_length)."""


PRESETS: dict[str, ShapesFluxConfig] = {
    "demo": ShapesFluxConfig(),
    "tiny": ShapesFluxConfig(latent_channels=4, vae_widths=(8, 16, 16, 16), vae_norm_groups=4, heads=2, head_dim=16,
                             double_layers=1, single_layers=1, rope_axes=(4, 6, 6), clip_hidden=32, clip_layers=1,
                             t5_dim=32, t5_layers=1),
}
"""``demo`` is the trained model; ``tiny`` runs every code path of the training script on a CPU in seconds."""


@dataclass
class TokenizerVocab:
    """The in-memory tokenizers' vocabularies, stored with a training run so that its export tokenizes exactly as
    training did (the BPE trainer that builds them may differ between ``tokenizers`` versions)."""

    clip_vocab: dict[str, int] = field(default_factory=dict)
    clip_merges: list[list[str]] = field(default_factory=list)
    t5_vocab: list[list[Any]] = field(default_factory=list)

    @staticmethod
    def build() -> TokenizerVocab:
        """CLIP: a word-level BPE over ``WORDS`` learnt deterministically (``deterministic_bpe``); T5: the tiny
        checkpoints' Unigram vocabulary (already deterministic)."""
        from services.tiny.tokenizers import t5_unigram_vocab

        vocab, merges = deterministic_bpe()
        return TokenizerVocab(vocab, [list(m) for m in merges], [list(p) for p in t5_unigram_vocab()])


def deterministic_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary (``</w>`` ends words) in which every word of ``WORDS`` is one token and any other
    text falls back to characters. Same layout as ``services.tiny.tokenizers.clip_vocab_and_merges`` (characters,
    word-final characters, merged symbols, then the two special tokens last), but learnt here with ties broken by
    the pair's text: the ``tokenizers`` trainer breaks ties in hash-map order, so its vocabulary (and the token ids
    a model is trained on) changes from process to process."""
    import re
    import string

    from services.tiny.tokenizers import WORDS

    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = sorted({p for w in WORDS for p in re.findall(r"\w+|[^\w\s]+", w.lower())})
    words = [list(p[:-1]) + [p[-1] + "</w>"] for p in pieces]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    vocab: dict[str, int] = {}
    for piece in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def make_tokenizers(vocab: TokenizerVocab, max_tokens: int) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer, T5Tokenizer

    clip = CLIPTokenizer(vocab=dict(vocab.clip_vocab), merges=[tuple(m) for m in vocab.clip_merges],
                         model_max_length=max_tokens)
    t5 = T5Tokenizer(vocab=[(str(p), float(s)) for p, s in vocab.t5_vocab], extra_ids=0, model_max_length=max_tokens)
    return clip, t5


def build_components(cfg: ShapesFluxConfig, tokenizer: Any, tokenizer_2: Any, seed: int) -> dict[str, Any]:
    """Randomly initialised components (seeded) of the demo architecture; keys are FluxPipeline's argument names."""
    from services.tiny.flux import clip_text_encoder, flux_scheduler, flux_transformer, flux_vae, t5_text_encoder

    torch.manual_seed(seed)
    vae = flux_vae(cfg.latent_channels, cfg.vae_widths, cfg.vae_norm_groups)
    text_encoder = clip_text_encoder(cfg.clip_hidden, cfg.clip_layers, cfg.clip_heads, cfg.clip_hidden,
                                     vocab=len(tokenizer), max_positions=cfg.max_tokens)
    text_encoder_2 = t5_text_encoder(cfg.t5_dim, cfg.t5_layers, cfg.t5_heads, vocab=len(tokenizer_2), dropout=0.0)
    transformer = flux_transformer(cfg.latent_channels, cfg.double_layers, cfg.single_layers, cfg.heads, cfg.head_dim,
                                   text_dim=cfg.t5_dim, pooled_dim=cfg.clip_hidden, guidance=False, axes=cfg.rope_axes)
    return {"scheduler": flux_scheduler(), "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "transformer": transformer}


def tokenize(tokenizer: Any, tokenizer_2: Any, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 token ids ``[N, max_tokens]`` padded as FluxPipeline pads them."""
    kw = {"padding": "max_length", "max_length": max_tokens, "truncation": True, "return_tensors": "pt"}
    return tokenizer(captions, **kw).input_ids, tokenizer_2(captions, **kw).input_ids


def encode_text(text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module, clip_ids: torch.Tensor,
                t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) exactly as FluxPipeline.encode_prompt computes them (no attention
    masks: the pipeline passes none), differentiable for joint training."""
    pooled = text_encoder(clip_ids, output_hidden_states=False).pooler_output
    embeds = text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return embeds, pooled


def make_pipeline(components: dict[str, Any]) -> Any:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_checkpoint(components: dict[str, Any], out_dir: Path, defaults: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a diffusers folder (weights in ``dtype``, shards <= 15 MB) plus chitu.json; checks the size limits."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    parts = dict(components)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        parts[name] = _copy_module(parts[name]).to(dtype)
    pipe = make_pipeline(parts)
    pipe.save_pretrained(out_dir, safe_serialization=True, max_shard_size=MAX_SHARD)
    (out_dir / "chitu.json").write_text(json.dumps(defaults or SERVING_DEFAULTS, indent=2) + "\n")
    check_folder_size(out_dir)
    return out_dir


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


def check_folder_size(folder: Path) -> int:
    """Raise ValueError when a file is over 15 MB or the folder over 30 MB; returns the folder's size."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    too_big = [f"{p.relative_to(folder)} ({p.stat().st_size} B)" for p in files if p.stat().st_size > MAX_FILE_BYTES]
    if too_big:
        raise ValueError(f"files over {MAX_FILE_BYTES} bytes: {too_big}")
    total = sum(p.stat().st_size for p in files)
    if total > MAX_FOLDER_BYTES:
        raise ValueError(f"{folder} holds {total} bytes, over {MAX_FOLDER_BYTES}")
    return total


def make_random_shapes_flux(out_dir: str | Path, seed: int = 0, preset: str = "demo") -> Path:
    """A randomly initialised checkpoint of the demo architecture (what tests use until trained weights exist)."""
    cfg = PRESETS[preset]
    tok, tok2 = make_tokenizers(TokenizerVocab.build(), cfg.max_tokens)
    return save_checkpoint(build_components(cfg, tok, tok2, seed), Path(out_dir))


# -- training-run state ----------------------------------------------------------------------------------------------

PROGRESS = "progress.json"
VAE_FILE = "vae.safetensors"
TRAINABLE_PREFIX = "trainable-"
SHARD_BYTES = 15 * 2**20
"""State files stay under 15 MiB (what comes back from the GPU machine is at most 16 MiB a file)."""


def config_to_json(cfg: ShapesFluxConfig) -> dict[str, Any]:
    return asdict(cfg)


def config_from_json(data: dict[str, Any]) -> ShapesFluxConfig:
    return ShapesFluxConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, prefix: str) -> list[str]:
    """Write ``tensors`` into ``prefix-NN.safetensors`` files of at most SHARD_BYTES each; removes stale shards."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().clone()  # clone: tied weights (T5 embeddings) must not share memory
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES - 2**16:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = []
    for i, shard in enumerate(shards):
        name = f"{prefix}{i:02d}.safetensors"
        save_file(shard, str(folder / f".{name}.tmp"))
        names.append(name)
    for stale in folder.glob(f"{prefix}*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    for name in names:
        (folder / f".{name}.tmp").replace(folder / name)
    return names


def load_sharded(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in names:
        out.update(load_file(str(folder / name)))
    return out


def trainable_modules(components: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The modules the transformer stage trains (the VAE is frozen by then)."""
    return {k: components[k] for k in ("transformer", "text_encoder", "text_encoder_2")}


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(progress, components) of a training run folder, weights loaded, the VAE's latent scale set."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    progress = json.loads((run_dir / PROGRESS).read_text())
    cfg = config_from_json(progress["model"])
    vocab = TokenizerVocab(**progress["tokenizers"])
    tok, tok2 = make_tokenizers(vocab, cfg.max_tokens)
    components = build_components(cfg, tok, tok2, seed=progress["train"]["seed"])  # the run's initial weights
    vae_state = {k: v.float() for k, v in load_file(str(run_dir / VAE_FILE)).items()}
    components["vae"].load_state_dict(vae_state)
    stats = progress["vae"].get("latent_stats")
    if stats:
        components["vae"].register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    names = progress["transformer"].get("files", [])
    if names:
        state = load_sharded(run_dir, names)
        for key, module in trainable_modules(components).items():
            sub = {k[len(key) + 1:]: v.float() for k, v in state.items() if k.startswith(key + ".")}
            module.load_state_dict(sub)
    return progress, components


def export_run(run_dir: Path, out_dir: Path, defaults: dict[str, Any] | None = None) -> Path:
    """The finished training run in ``run_dir`` as a diffusers folder (bf16, shards <= 15 MB) at ``out_dir``."""
    progress, components = load_run(run_dir)
    if not progress["transformer"].get("files"):
        raise ValueError(f"{run_dir} has no transformer weights yet: train first")
    return save_checkpoint(components, out_dir, defaults)
