"""Tiny randomly initialised stand-ins for Stable Diffusion inpainting and SAM, built offline.

They have the real classes and file formats, so the FMAS code loads them through the same path
as the real weights (``from_pretrained(local_files_only=True)``, ``torch.load`` of a state_dict).
Their outputs are noise: they exist for the tests and the ``:demo`` configs. Build them with

    python -m synthesis.tiny_models --out_dir=workdirs/tiny_models

which writes ``<out_dir>/sd_inpaint/`` (diffusers folder) and ``<out_dir>/sam_tiny.pth``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from synthesis.masks import build_tiny_sam

# A byte-level BPE vocabulary of single characters: enough for CLIPTokenizer to run.
_VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def _write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in _VOCAB_CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_inpaint_pipeline(out_dir: str | os.PathLike, *, seed: int) -> Path:
    """Builds a tiny random ``StableDiffusionInpaintPipeline`` and ``save_pretrained``s it.

    Args:
      out_dir: destination folder (created).
      seed: torch seed for the random weights.

    Returns:
      ``out_dir`` as a Path.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(
            os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=9,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            # Three levels: latents at 1/4 resolution (SD's real VAE: 1/8).
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_sam_checkpoint(path: str | os.PathLike, *, seed: int) -> Path:
    """Saves the ``state_dict`` of :func:`synthesis.masks.build_tiny_sam` (random) to ``path``.

    Load it with ``sam.model_type="tiny"``.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_tiny_sam()
    torch.save(sam.state_dict(), path)
    return path


def main(argv: list[str]) -> None:
    """``python -m synthesis.tiny_models --out_dir=DIR``: writes both tiny models into DIR."""
    out = "workdirs/tiny_models"
    for arg in argv[1:]:
        if arg.startswith("--out_dir="):
            out = arg.split("=", 1)[1]
        else:
            raise SystemExit(f"unknown argument {arg!r}; usage: --out_dir=DIR")
    sd = build_tiny_inpaint_pipeline(Path(out) / "sd_inpaint", seed=0)
    sam = build_tiny_sam_checkpoint(Path(out) / "sam_tiny.pth", seed=0)
    print(f"wrote {sd} and {sam}")


if __name__ == "__main__":
    main(sys.argv)
