"""FMAS prompts (Sec. 3.1): an LLM asked the paper's question per class, or an offline library.

When ``llm_base_url`` is set, the paper's question is sent to an OpenAI-compatible
``/chat/completions`` endpoint; the answer is parsed into a prompt and a negative prompt and cached
per class as ``<cache_dir>/<category>.json`` (so a class is asked once, and runs are repeatable).
The API key is read from the environment variable named in the config and is never logged or
written. Without an endpoint, :data:`PROMPT_LIBRARY` (all 15 MVTec AD and 12 VisA classes, plus a
generic fallback) is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

# The question of Sec. 3.1, verbatim, with the class label filled in.
PAPER_QUESTION = (
    "It's an image of a {label}. If anomalies are to be generated on this object using Stable "
    "Diffusion's inpainting mode, what prompts and negative prompts should be used?"
)
# Asks for a machine-readable answer; the question itself is the paper's.
ANSWER_FORMAT = (
    'Answer with one JSON object only: {"prompt": "...", "negative_prompt": "..."}, each a '
    "comma-separated Stable Diffusion prompt."
)


@dataclasses.dataclass(frozen=True)
class PromptPair:
    """A prompt and a negative prompt for one class, and where they came from."""

    prompt: str
    negative_prompt: str
    source: str  # "library", "llm" or "llm-cache"


_NEG_COMMON = "blurry, low quality, cartoon, text, watermark, distorted object, extra objects"

# Offline prompts, written from the MVTec AD / VisA defect types of each class.
PROMPT_LIBRARY: dict[str, tuple[str, str]] = {
    # MVTec AD (15)
    "bottle": (
        "close-up photo of a glass bottle top with a broken chipped rim, crack, "
        "contamination stain, realistic industrial defect",
        _NEG_COMMON + ", intact rim, clean glass",
    ),
    "cable": (
        "close-up photo of a cable cross-section with a cut insulation, bent wire, "
        "missing wire, poked insulation, realistic industrial defect",
        _NEG_COMMON + ", perfect cable, intact insulation",
    ),
    "capsule": (
        "close-up photo of a pill capsule with a crack, squeezed dent, faulty imprint, "
        "poke hole, scratch, realistic defect",
        _NEG_COMMON + ", perfect capsule, smooth surface",
    ),
    "carpet": (
        "close-up photo of woven carpet with a hole, cut thread, colored stain, "
        "metal contamination, realistic textile defect",
        _NEG_COMMON + ", uniform weave, clean carpet",
    ),
    "grid": (
        "close-up photo of a metal wire grid with a bent wire, broken wire, glue blob, "
        "thread contamination, realistic defect",
        _NEG_COMMON + ", regular mesh, intact grid",
    ),
    "hazelnut": (
        "close-up photo of a hazelnut with a crack, cut, hole, print mark on the shell, "
        "realistic defect",
        _NEG_COMMON + ", perfect hazelnut, smooth shell",
    ),
    "leather": (
        "close-up photo of leather with a cut, fold, glue stain, poke hole, color stain, "
        "realistic leather defect",
        _NEG_COMMON + ", uniform leather grain, clean surface",
    ),
    "metal_nut": (
        "close-up photo of a metal nut with a bent lobe, scratch, color stain, flipped side, "
        "realistic machined part defect",
        _NEG_COMMON + ", perfect metal nut, clean metal",
    ),
    "pill": (
        "close-up photo of a white pill with a crack, red color speckle, contamination, "
        "chipped edge, faulty imprint, realistic defect",
        _NEG_COMMON + ", perfect pill, smooth coating",
    ),
    "screw": (
        "close-up photo of a metal screw with a damaged thread, scratched head, bent tip, "
        "manipulated front, realistic defect",
        _NEG_COMMON + ", perfect screw, intact thread",
    ),
    "tile": (
        "close-up photo of a ceramic tile with a crack, glue strip, gray stroke, rough patch, "
        "oil stain, realistic surface defect",
        _NEG_COMMON + ", intact tile, uniform pattern",
    ),
    "toothbrush": (
        "close-up photo of a toothbrush head with frayed bent bristles, missing bristles, "
        "defective tuft, realistic defect",
        _NEG_COMMON + ", perfect toothbrush, neat bristles",
    ),
    "transistor": (
        "close-up photo of a transistor on a board with a bent lead, cut lead, damaged case, "
        "misplaced component, realistic defect",
        _NEG_COMMON + ", perfect transistor, straight leads",
    ),
    "wood": (
        "close-up photo of a wooden board with a scratch, hole, liquid stain, color patch, "
        "crack in the grain, realistic wood defect",
        _NEG_COMMON + ", uniform wood grain, clean wood",
    ),
    "zipper": (
        "close-up photo of a zipper with broken teeth, split teeth, squeezed teeth, "
        "fabric rough interior, realistic defect",
        _NEG_COMMON + ", perfect zipper, aligned teeth",
    ),
    # VisA (12)
    "candle": (
        "close-up photo of a white candle with a chunk of wax missing, foreign particle, "
        "wax melded, damaged corner, realistic defect",
        _NEG_COMMON + ", perfect candle, smooth wax",
    ),
    "capsules": (
        "close-up photo of green soft capsules with a bubble, discoloration, leak, "
        "misshape, realistic defect",
        _NEG_COMMON + ", perfect capsules, clear gel",
    ),
    "cashew": (
        "close-up photo of a cashew nut with a burnt spot, crack, hole, stuck-on particle, "
        "realistic food defect",
        _NEG_COMMON + ", perfect cashew, even color",
    ),
    "chewinggum": (
        "close-up photo of a chewing gum piece with a chunk missing, corner missing, scratch, "
        "similar colored spot, realistic defect",
        _NEG_COMMON + ", perfect chewing gum, smooth coating",
    ),
    "fryum": (
        "close-up photo of a wheel-shaped fryum snack with a burnt spot, break, "
        "foreign particle, fryum stuck together, realistic food defect",
        _NEG_COMMON + ", perfect fryum, even color",
    ),
    "macaroni1": (
        "close-up photo of a macaroni piece with a chip around the edge, crack, small scratch, "
        "middle breakage, realistic food defect",
        _NEG_COMMON + ", perfect macaroni, smooth surface",
    ),
    "macaroni2": (
        "close-up photo of a macaroni piece on a textured background with a crack, breakage "
        "down the middle, color spot, small chip, realistic defect",
        _NEG_COMMON + ", perfect macaroni, intact shape",
    ),
    "pcb1": (
        "close-up photo of a printed circuit board with a bent pin, melted component, "
        "missing part, scratch, realistic electronics defect",
        _NEG_COMMON + ", perfect circuit board, clean solder",
    ),
    "pcb2": (
        "close-up photo of a printed circuit board with a bent lead, burnt component, "
        "missing chip, scratch on the board, realistic electronics defect",
        _NEG_COMMON + ", perfect circuit board, clean solder",
    ),
    "pcb3": (
        "close-up photo of a printed circuit board with a bent pin, melted plastic, "
        "missing component, scratch, realistic electronics defect",
        _NEG_COMMON + ", perfect circuit board, clean solder",
    ),
    "pcb4": (
        "close-up photo of a printed circuit board with a burnt spot, damaged LED, dirt, "
        "missing component, scratch, realistic electronics defect",
        _NEG_COMMON + ", perfect circuit board, clean solder",
    ),
    "pipe_fryum": (
        "close-up photo of a pipe-shaped fryum snack with a burnt spot, crack, broken piece, "
        "foreign particle, realistic food defect",
        _NEG_COMMON + ", perfect fryum, even color",
    ),
}

GENERIC_PROMPT: tuple[str, str] = (
    "close-up photo of the {label} with a realistic surface defect: scratch, crack, dent, "
    "stain, contamination, missing piece",
    _NEG_COMMON + ", perfect undamaged {label}",
)


def library_prompts(category: str) -> PromptPair:
    """Offline prompts for a class; a generic template for classes not in the library."""
    if category in PROMPT_LIBRARY:
        prompt, negative = PROMPT_LIBRARY[category]
    else:
        label = category.replace("_", " ")
        prompt, negative = (s.format(label=label) for s in GENERIC_PROMPT)
    return PromptPair(prompt=prompt, negative_prompt=negative, source="library")


def parse_llm_answer(text: str) -> tuple[str, str]:
    """Parses an LLM answer into ``(prompt, negative_prompt)``.

    Accepts a JSON object with ``prompt`` / ``negative_prompt`` (possibly inside a code fence or
    surrounded by prose), or labelled lines such as ``Prompt: ...`` and ``Negative prompt: ...``.

    Raises:
      ValueError: neither form is found.
    """
    for match in re.finditer(r"\{.*?\}", text, flags=re.DOTALL):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            keys = {k.lower().replace(" ", "_").replace("-", "_"): v for k, v in obj.items()}
            if "prompt" in keys and "negative_prompt" in keys:
                return str(keys["prompt"]).strip(), str(keys["negative_prompt"]).strip()
    pos = neg = None
    for line in text.splitlines():
        m_neg = re.match(r"^\W*negative[ _-]?prompts?\W*[:：]\s*(.*)$", line, flags=re.IGNORECASE)
        m_pos = re.match(
            r"^\W*(?:positive[ _-]?)?prompts?\W*[:：]\s*(.*)$", line, flags=re.IGNORECASE
        )
        if m_neg and neg is None:
            neg = m_neg.group(1).strip().strip("*\"'` ")
        elif m_pos and pos is None:
            pos = m_pos.group(1).strip().strip("*\"'` ")
    if pos and neg:
        return pos, neg
    raise ValueError(f"Could not find a prompt and a negative prompt in the LLM answer: {text!r}")


def query_llm(
    category: str,
    *,
    base_url: str,
    model: str,
    api_key: str | None,
    timeout_s: float,
) -> tuple[str, str]:
    """Asks the paper's question for ``category`` at an OpenAI-compatible chat endpoint.

    Args:
      category: class label (underscores become spaces).
      base_url: e.g. ``"https://api.openai.com/v1"``; ``/chat/completions`` is appended.
      model: model name sent to the endpoint.
      api_key: bearer token or None (local endpoints); never logged.
      timeout_s: HTTP timeout.

    Returns:
      ``(prompt, negative_prompt)``.
    """
    question = PAPER_QUESTION.format(label=category.replace("_", " "))
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": question + "\n" + ANSWER_FORMAT}],
            "temperature": 0,
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = base_url.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = json.loads(response.read().decode())
    except urllib.error.HTTPError as err:
        # The error text is the server's, which never echoes our headers; the key stays out.
        raise RuntimeError(
            f"LLM endpoint {url} answered HTTP {err.code} for class {category!r} "
            "(check prompts.llm_base_url, prompts.llm_model and the API key variable)."
        ) from None
    except urllib.error.URLError as err:
        raise RuntimeError(
            f"LLM endpoint {url} unreachable ({err.reason}); set prompts.llm_base_url='' to use "
            "the offline prompt library."
        ) from None
    return parse_llm_answer(payload["choices"][0]["message"]["content"])


def get_prompts(
    category: str,
    *,
    llm_base_url: str,
    llm_model: str,
    api_key_env: str,
    cache_dir: str | os.PathLike,
    timeout_s: float,
) -> PromptPair:
    """Prompts for one class: from the per-class cache, the LLM, or the offline library.

    Args:
      category: class label.
      llm_base_url: OpenAI-compatible base URL; empty string means "use the offline library".
      llm_model: model name for the endpoint.
      api_key_env: name of the environment variable holding the key ("" for no key).
      cache_dir: where ``<category>.json`` answers are cached.
      timeout_s: HTTP timeout.

    Returns:
      A :class:`PromptPair`.
    """
    if not llm_base_url:
        return library_prompts(category)
    path = Path(cache_dir) / f"{category}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("base_url") == llm_base_url and cached.get("model") == llm_model:
            return PromptPair(cached["prompt"], cached["negative_prompt"], source="llm-cache")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise RuntimeError(
                f"prompts.llm_base_url is set but the environment variable {api_key_env!r} "
                "(config field prompts.api_key_env) is empty. Export the key, set "
                "prompts.api_key_env='' for an endpoint without a key, or set "
                "prompts.llm_base_url='' to use the offline prompt library."
            )
    log.info("Asking %s (model %s) for prompts of class %r.", llm_base_url, llm_model, category)
    prompt, negative = query_llm(
        category, base_url=llm_base_url, model=llm_model, api_key=api_key, timeout_s=timeout_s
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(
        json.dumps(
            {
                "category": category,
                "question": PAPER_QUESTION.format(label=category.replace("_", " ")),
                "base_url": llm_base_url,
                "model": llm_model,
                "prompt": prompt,
                "negative_prompt": negative,
            },
            indent=2,
        )
    )
    os.replace(tmp, path)
    return PromptPair(prompt, negative, source="llm")
