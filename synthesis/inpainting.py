"""FMAS inpainting (Sec. 3.1): Stable Diffusion inpainting from a local folder, DPM++ 2M.

Per image-mask pair: one CFG scale and one denoising strength (drawn by the caller in [5, 10] and
[0.5, 0.85]) and ``K`` seeds (five in the paper); the ``K`` candidates are generated in one batched
call, one ``torch.Generator`` per seed, and each is composited so that every pixel outside ``M`` is
exactly the original's.

Prompts longer than CLIP's 77 tokens are not truncated: as the Stable Diffusion WebUI the paper
used, they are encoded in chunks of 75 tokens (+ start and end), the chunk embeddings
concatenated along the sequence and passed as ``prompt_embeds`` (:func:`encode_prompts`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SD_FOLDER_HELP = (
    "Expected a diffusers Stable Diffusion inpainting folder (model_index.json, unet/, vae/, "
    "text_encoder/, tokenizer/, scheduler/). Make it once on a machine with network access, e.g.\n"
    '  python -c "from diffusers import StableDiffusionInpaintPipeline as P; '
    "P.from_pretrained('stable-diffusion-v1-5/stable-diffusion-inpainting')"
    ".save_pretrained('{path}')\"\n"
    "(or 'runwayml/stable-diffusion-inpainting', 'stabilityai/stable-diffusion-2-inpainting'), "
    "copy it to {path}, or set --config.inpaint.model_dir to where it is."
)


def load_inpaint_pipeline(model_dir: str | os.PathLike, *, device: str, half_precision: bool):
    """Loads ``StableDiffusionInpaintPipeline`` from a local folder with the DPM++ 2M scheduler.

    Args:
      model_dir: a folder written by ``save_pretrained`` (never downloaded: local files only).
      device: torch device string.
      half_precision: float16 weights (used only on CUDA).

    Returns:
      The pipeline, on ``device``, safety checker off, progress bar off.

    Raises:
      FileNotFoundError: the folder or its ``model_index.json`` is missing.
    """
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline

    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"Stable Diffusion inpainting model not found: {model_dir / 'model_index.json'} "
            "(config field inpaint.model_dir). " + SD_FOLDER_HELP.format(path=model_dir)
        )
    dtype = torch.float16 if (half_precision and device.startswith("cuda")) else torch.float32
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        model_dir,
        local_files_only=True,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # DPM++ 2M = multistep DPM-Solver++ of order 2.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


CHUNK_TOKENS = 75  # CLIP's 77 minus the start and end tokens, the WebUI's chunk length
COMMA_LOOKBACK = 20  # the WebUI ends a full chunk at its last comma if within this many tokens


def prompt_chunks(tokenizer, text: str, *, min_chunks: int = 1) -> list[list[int]]:
    """``text``'s token ids in 77-token chunks, none dropped (the WebUI's chunking).

    Tokens are taken 75 at a time; a full chunk ends after its last comma when that comma is
    among its last ``COMMA_LOOKBACK`` tokens (so a phrase is not cut in two), the rest moving to
    the next chunk. Each chunk is ``[start] + tokens + [end] + [pad] * (75 - len(tokens))``: a
    prompt of at most 75 tokens gives exactly the ids diffusers' own encoding gives.

    Args:
      tokenizer: the pipeline's ``CLIPTokenizer``.
      text: the prompt.
      min_chunks: pad with empty chunks up to this many (a negative prompt matches its prompt).

    Returns:
      ``[num_chunks][77]`` token ids.
    """
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[list[int]] = []
    current: list[int] = []
    for token in ids:
        current.append(token)
        if len(current) == CHUNK_TOKENS:
            commas = [i for i, t in enumerate(current) if t == comma]
            cut = commas[-1] + 1 if commas and CHUNK_TOKENS - commas[-1] <= COMMA_LOOKBACK else 0
            if cut and cut < CHUNK_TOKENS:
                chunks.append(current[:cut])
                current = current[cut:]
            else:
                chunks.append(current)
                current = []
    if current or not chunks:
        chunks.append(current)
    chunks += [[] for _ in range(min_chunks - len(chunks))]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return [[bos, *c, eos] + [pad] * (CHUNK_TOKENS - len(c)) for c in chunks]


def encode_prompts(pipe, prompt: str, negative_prompt: str):
    """CLIP embeddings of a prompt and its negative prompt, chunked (:func:`prompt_chunks`).

    Returns:
      ``(prompt_embeds, negative_prompt_embeds)``, each ``[1, 77 * n, D]`` with the same ``n``
      (the longer of the two's chunk count), on the pipeline's device.
    """
    import torch

    n = max(len(prompt_chunks(pipe.tokenizer, t)) for t in (prompt, negative_prompt))
    ids = [prompt_chunks(pipe.tokenizer, t, min_chunks=n) for t in (prompt, negative_prompt)]
    tokens = torch.tensor(ids[0] + ids[1], device=pipe.device)  # [2n, 77]
    with torch.inference_mode():
        hidden = pipe.text_encoder(tokens)[0]  # [2n, 77, D]
    hidden = hidden.to(pipe.text_encoder.dtype)
    width = hidden.shape[-1]
    return hidden[:n].reshape(1, -1, width), hidden[n:].reshape(1, -1, width)


def processing_size(height: int, width: int, *, resolution: int) -> tuple[int, int]:
    """Size SD runs at: the longer side ``resolution``, aspect kept, both sides multiples of 8."""
    scale = resolution / max(height, width)
    return (
        max(8, round(height * scale / 8) * 8),
        max(8, round(width * scale / 8) * 8),
    )


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Keeps ``generated`` inside ``mask`` and ``original`` elsewhere.

    Args:
      original: uint8 ``[H, W, 3]``.
      generated: uint8 ``[..., H, W, 3]``.
      mask: bool ``[H, W]`` (M).

    Returns:
      uint8 ``[..., H, W, 3]``, equal to ``original`` outside ``mask`` bit for bit.
    """
    return np.where(mask[..., None], generated, original).astype(np.uint8)


def inpaint_candidates(
    pipe,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    prompt: str,
    negative_prompt: str,
    seeds: Sequence[int],
    cfg: float,
    strength: float,
    steps: int,
    resolution: int,
) -> np.ndarray:
    """The ``K`` inpainted candidates ``I_A^(k)`` of one image-mask pair (Sec. 3.1).

    Args:
      pipe: from :func:`load_inpaint_pipeline`.
      image: uint8 ``[H, W, 3]``, the normal image ``I_N``.
      mask: bool ``[H, W]``, ``M`` of eq. 1.
      prompt, negative_prompt: text guidance, any length (encoded in 77-token chunks).
      seeds: ``K`` sampling seeds (the only thing that varies between candidates).
      cfg: classifier-free guidance scale.
      strength: denoising strength.
      steps: sampler steps (20 in the paper).
      resolution: longer side SD runs at (512 for SD 1.5 / 2 inpainting).

    Returns:
      uint8 ``[K, H, W, 3]``, each equal to ``image`` outside ``mask``.
    """
    import torch

    h, w = image.shape[:2]
    ph, pw = processing_size(h, w, resolution=resolution)
    init = Image.fromarray(image).resize((pw, ph), Image.Resampling.BICUBIC)
    mask_im = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    mask_im = mask_im.resize((pw, ph), Image.Resampling.NEAREST)
    # CPU generators: diffusers draws the noise on the CPU and moves it, so a seed gives the same
    # initial noise on any device.
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    prompt_embeds, negative_embeds = encode_prompts(pipe, prompt, negative_prompt)
    with torch.inference_mode():
        out = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            image=init,
            mask_image=mask_im,
            height=ph,
            width=pw,
            num_inference_steps=steps,
            guidance_scale=cfg,
            strength=strength,
            num_images_per_prompt=len(seeds),
            generator=generators,
            output_type="np",
        ).images
    generated = np.clip(np.rint(np.asarray(out, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if (ph, pw) != (h, w):
        generated = np.stack(
            [
                np.asarray(Image.fromarray(g).resize((w, h), Image.Resampling.BICUBIC))
                for g in generated
            ]
        )
    return composite(image, generated, mask)
