"""Shared test utilities: relative error, non-degenerate random weights, diffusers reference models."""

from __future__ import annotations

import torch

from longsana.config import TransformerConfig
from longsana.testing import randomize_
from longsana.testing import rel_err as _rel_err


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, refusing a near-zero reference (a comparison on zeros proves nothing)."""
    assert ref.double().norm() > 1e-6 * ref.numel() ** 0.5, "reference is (nearly) zero"
    return _rel_err(out, ref)


def diffusers_transformer(cfg: TransformerConfig, seed: int = 0):
    """diffusers' SanaVideoTransformer3DModel for `cfg`, with random weights."""
    from diffusers import SanaVideoTransformer3DModel

    kw = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    return randomize_(SanaVideoTransformer3DModel(**kw).eval(), seed)


def diffusers_vae(cfg, seed: int | None = 0):
    """diffusers' AutoencoderKLWan for `cfg` (a VAEConfig), with random weights (seed None: its own init)."""
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}).eval()
    return ref if seed is None else randomize_(ref, seed)


PROMPT_WORDS = ("a an the one two three red green blue yellow white black purple orange circle circles square "
                "squares triangle triangles star moving left right up down bouncing still spinning on background "
                "motion score : . 10 30")


def tiny_text_encoder(dim: int, seed: int = 0):
    """A small Gemma2 with a word-level tokenizer over the CHI and a few prompt words."""
    from longsana.text import CHI_SANA, TextEncoder, build_gemma2, build_word_tokenizer

    tok = build_word_tokenizer(["\n".join(CHI_SANA), PROMPT_WORDS])
    return TextEncoder(tok, build_gemma2(len(tok), hidden_size=dim, seed=seed))


def tiny_pipeline(seed: int = 0):
    """The streaming pipeline of the "tiny" config with random weights, on the CPU in fp32."""
    from longsana.config import get_config
    from longsana.model import LongSANATransformer
    from longsana.stream import Pipeline
    from longsana.vae import WanVAE

    spec = get_config("tiny")
    model = randomize_(LongSANATransformer(spec.transformer).eval(), seed)
    vae = randomize_(WanVAE(spec.vae).eval(), seed + 1)
    return Pipeline(model, vae, tiny_text_encoder(spec.transformer.caption_channels, seed), spec)


def save_pipeline(pipe, folder):
    """Write `pipe` as a diffusers-layout model folder."""
    pipe.save_pretrained(folder)
    return folder
