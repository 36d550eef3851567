"""FMAS prompts (Sec. 3.1): an LLM asked the paper's question per class, or an offline library.

When ``llm_base_url`` is set, the paper's question is sent to an OpenAI-compatible
``/chat/completions`` endpoint; the answer is parsed into a prompt and a negative prompt and cached
per class as ``<cache_dir>/<category>.json`` (so a class is asked once, and runs are repeatable).
The API key is read from the environment variable named in the config and is never logged,
written or put in an error. The client sends it over https only (plain http to this machine
only), follows no redirect, caps the answer's size, bounds the whole exchange by one deadline and
retries 429/5xx with exponential backoff. Without an endpoint, :data:`PROMPT_LIBRARY` (all 15
MVTec AD and 12 VisA classes, plus a generic fallback) is used.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import io
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 1 << 20  # an answer is a few hundred bytes
MAX_ATTEMPTS = 4
FIRST_BACKOFF_S = 0.5
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

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


def _preview(text: str, limit: int = 200) -> str:
    """``text`` for an error message: repr'd and cut to ``limit`` characters."""
    return repr(text[:limit]) + (f" ... ({len(text)} characters)" if len(text) > limit else "")


# The characters that decide where a JSON object starts and ends.
_JSON_SYNTAX = re.compile(r'[{}"\\]')


def _outermost_objects(text: str) -> list[str]:
    """The outermost balanced ``{...}`` spans of ``text``, found in one pass.

    Braces inside JSON strings do not count, and an unmatched ``{`` is passed over, so an object
    after stray braces is still found. The spans are disjoint, so decoding every one of them reads
    each character at most once more: linear in ``len(text)`` (the ``\\{.*?\\}`` regex this
    replaces rescanned the rest of the text from every ``{``, quadratic on ``{``-heavy answers).
    """
    opens: list[int] = []  # positions of the ``{`` not yet closed
    spans: list[tuple[int, int]] = []
    in_string = False
    escaped = -1  # position of a character escaped by a backslash inside a string
    for match in _JSON_SYNTAX.finditer(text):
        i, char = match.start(), match.group()
        if i == escaped:
            continue
        if in_string:
            if char == "\\":
                escaped = i + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = bool(opens)  # quotes in prose outside any object do not matter
        elif char == "{":
            opens.append(i)
        elif char == "}" and opens:
            start = opens.pop()
            while spans and spans[-1][0] > start:  # spans inside this one
                spans.pop()
            spans.append((start, i + 1))
    return [text[start:end] for start, end in spans]


def _prompt_pair(obj: Any) -> tuple[str, str] | None:
    """``(prompt, negative_prompt)`` of a decoded JSON object holding both as text, else None."""
    if not isinstance(obj, dict):
        return None
    keys = {str(k).lower().replace(" ", "_").replace("-", "_"): v for k, v in obj.items()}
    pair = keys.get("prompt"), keys.get("negative_prompt")
    if all(isinstance(v, str) and v.strip() for v in pair):
        return pair[0].strip(), pair[1].strip()
    return None


def parse_llm_answer(text: str) -> tuple[str, str]:
    """Parses an LLM answer into ``(prompt, negative_prompt)``, in time linear in its length.

    Accepts a JSON object with ``prompt`` / ``negative_prompt`` strings (possibly inside a code
    fence or surrounded by prose), or labelled lines such as ``Prompt: ...`` and
    ``Negative prompt: ...``.

    Raises:
      ValueError: neither form is found.
    """
    for candidate in _outermost_objects(text):
        try:
            pair = _prompt_pair(json.loads(candidate))
        except (ValueError, RecursionError):  # not JSON, or nested deeper than json allows
            continue
        if pair:
            return pair
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
    raise ValueError(
        f"could not find a prompt and a negative prompt in the answer {_preview(text)}"
    )


class LLMEndpointError(RuntimeError):
    """The LLM endpoint is refused, unreachable, too slow, or answered something unusable."""


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False


def check_endpoint(base_url: str) -> urllib.parse.SplitResult:
    """Refuses a base URL the API key must not be sent to.

    Args:
      base_url: the config's ``prompts.llm_base_url``.

    Returns:
      The parsed URL.

    Raises:
      LLMEndpointError: not https (plain http is allowed only to localhost, 127.0.0.0/8 and
        ::1), no host, a bad port, or credentials in the URL.
    """
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    field = "prompts.llm_base_url"
    if parts.username is not None or parts.password is not None:
        # The URL itself is not repeated: it holds a secret.
        raise LLMEndpointError(
            f"{field} holds credentials (user:password@host); remove them and put the key in "
            "the environment variable named by prompts.api_key_env."
        )
    if not (parts.scheme == "https" and host) and not (parts.scheme == "http" and _is_local(host)):
        raise LLMEndpointError(
            f"{field}={base_url!r} is refused: the endpoint must use https:// (plain http:// only "
            "for localhost, 127.0.0.0/8 or ::1), e.g. 'https://api.openai.com/v1'; set it to '' "
            "to use the offline prompt library."
        )
    try:
        parts.port  # noqa: B018 -- parsing the port raises on a malformed one
    except ValueError as err:
        raise LLMEndpointError(f"{field}={base_url!r} has a bad port ({err}).") from None
    return parts


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, every read bounded by what is left of an overall deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        # Like http.client's own reader, this keeps the socket open after the connection object
        # lets go of it (it does for responses that end when the connection closes).
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(remaining)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response whose status line, headers and body all share one deadline.

    A socket timeout bounds each read only, so a server dripping a byte at a time could stall a
    plain response forever.
    """

    def __init__(self, sock: socket.socket, *args, deadline: float, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


class _TooLarge(Exception):
    pass


def _post(
    parts: urllib.parse.SplitResult,
    body: bytes,
    headers: dict[str, str],
    *,
    deadline: float,
    max_bytes: int,
) -> tuple[int, str | None, bytes]:
    """One POST to ``<base_url>/chat/completions``; never follows a redirect.

    Returns:
      The status, the ``Location`` header and, for status 200, the body.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    host = parts.hostname or ""
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            host, parts.port or 443, timeout=remaining, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(host, parts.port or 80, timeout=remaining)
    connection.response_class = functools.partial(_DeadlineResponse, deadline=deadline)
    target = parts.path.rstrip("/") + "/chat/completions"
    if parts.query:
        target += "?" + parts.query
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise _TooLarge
        data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _TooLarge
        return response.status, None, data
    finally:
        connection.close()


def _answer_text(data: bytes) -> str:
    """``choices[0].message.content`` of a chat completion; ValueError says what is wrong."""
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(
            f"answered with something that is not JSON: {_preview(data.decode('utf-8', 'replace'))}"
        ) from None
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"answered without a 'choices' list: {_preview(json.dumps(payload))}")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise ValueError(
            f"answered without a text choices[0].message.content: {_preview(json.dumps(payload))}"
        )
    return content


def query_llm(
    category: str,
    *,
    base_url: str,
    model: str,
    api_key: str | None,
    timeout_s: float,
    max_attempts: int = MAX_ATTEMPTS,
    max_answer_bytes: int = MAX_ANSWER_BYTES,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, str]:
    """Asks the paper's question for ``category`` at an OpenAI-compatible chat endpoint.

    Args:
      category: class label (underscores become spaces).
      base_url: e.g. ``"https://api.openai.com/v1"``; ``/chat/completions`` is appended. https,
        or http to this machine only (:func:`check_endpoint`). Redirects are not followed.
      model: model name sent to the endpoint.
      api_key: bearer token or None (local endpoints); never logged or put in an error.
      timeout_s: overall deadline for the whole exchange, retries and their waits included.
      max_attempts: tries when the endpoint answers 429 or 5xx, with waits of
        ``FIRST_BACKOFF_S * 2**i`` seconds between them (none that would pass the deadline).
      max_answer_bytes: longer answers are refused.
      sleep: waits between attempts (tests pass a recorder).

    Returns:
      ``(prompt, negative_prompt)``.

    Raises:
      LLMEndpointError: naming the endpoint and what went wrong.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}.")
    parts = check_endpoint(base_url)
    url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/chat/completions"

    def error(problem: str) -> LLMEndpointError:
        # Text from the server is quoted in some messages; a server echoing the key must not
        # put it into an exception (and from there into a log).
        message = f"LLM endpoint {url} {problem} (class {category!r})."
        return LLMEndpointError(message.replace(api_key, "<API key>") if api_key else message)

    question = PAPER_QUESTION.format(label=category.replace("_", " "))
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": question + "\n" + ANSWER_FORMAT}],
            "temperature": 0,
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.monotonic() + timeout_s
    for attempt in range(1, max_attempts + 1):
        try:
            status, location, data = _post(
                parts, body, headers, deadline=deadline, max_bytes=max_answer_bytes
            )
        except TimeoutError:
            raise error(
                f"gave no complete answer within prompts.timeout_s={timeout_s:g} s "
                f"(attempt {attempt})"
            ) from None
        except _TooLarge:
            raise error(f"answered with more than {max_answer_bytes} bytes; refused") from None
        except (OSError, http.client.HTTPException) as err:
            raise error(
                f"is unreachable or broke the connection ({type(err).__name__}: {err}); check "
                "prompts.llm_base_url, or set it to '' to use the offline prompt library"
            ) from None
        if status == 200:
            try:
                prompt, negative = parse_llm_answer(_answer_text(data))
            except ValueError as err:
                raise error(str(err)) from None
            if api_key and (api_key in prompt or api_key in negative):
                raise error("echoed the API key in its answer; refused")
            return prompt, negative
        if 300 <= status < 400:
            raise error(
                f"answered with a redirect (HTTP {status} to {location!r}), which is not followed "
                "so the key goes nowhere else; set prompts.llm_base_url to the final address"
            )
        delay = FIRST_BACKOFF_S * 2 ** (attempt - 1)
        retry = status in RETRY_STATUSES and attempt < max_attempts
        if retry and time.monotonic() + delay < deadline:
            log.warning("%s answered HTTP %d; retrying in %.1f s.", url, status, delay)
            sleep(delay)
            continue
        if status in (401, 403):
            hint = "check the key in the variable named by prompts.api_key_env"
        elif retry:
            hint = f"no time left for another attempt within prompts.timeout_s={timeout_s:g} s"
        else:
            hint = "check prompts.llm_base_url and prompts.llm_model"
        raise error(f"answered HTTP {status} after {attempt} attempt(s); {hint}")
    raise AssertionError("unreachable: the loop returns or raises")


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
      timeout_s: overall deadline of the LLM exchange (see :func:`query_llm`).

    Returns:
      A :class:`PromptPair`.
    """
    if not llm_base_url:
        return library_prompts(category)
    check_endpoint(llm_base_url)  # a refused endpoint is an error even when answers are cached
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
