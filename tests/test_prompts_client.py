"""The FMAS LLM client (synthesis/prompts.py) against fake endpoints on 127.0.0.1.

The fake servers are ``fake_llm.serve``. Errors are checked as RuntimeError, the base of
``prompts.LLMEndpointError`` and what callers catch. No test asserts a wall-clock time; the slow
servers stop on their own after a few seconds.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import traceback

import pytest
from fake_llm import completion, send, serve

from synthesis import prompts

KEY = "sk-test-SECRET-0d1f2e"
ANSWER = {"prompt": "deep scratch, crack", "negative_prompt": "blurry, clean"}


def ask(base_url: str, **kwargs) -> tuple[str, str]:
    options = dict(base_url=base_url, model="test-model", api_key=KEY, timeout_s=10.0)
    options.update(kwargs)
    return prompts.query_llm("metal_nut", **options)


def error_text(error: BaseException) -> str:
    """Everything a traceback of ``error`` would print, chained exceptions included."""
    return "".join(traceback.format_exception(error))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_and_the_key_goes_nowhere_else(status):
    with serve(lambda h: send(h, 200, completion(json.dumps(ANSWER)))) as (elsewhere, reached):
        target = elsewhere + "/chat/completions"
        with serve(lambda h: send(h, status, b"", Location=target)) as (base_url, seen):
            with pytest.raises(RuntimeError, match=f"redirect \\(HTTP {status}") as err:
                ask(base_url)
    assert reached == [], "the redirect was followed"
    assert [r["authorization"] for r in seen] == [f"Bearer {KEY}"]
    assert base_url in str(err.value)
    assert KEY not in error_text(err.value)


@pytest.mark.parametrize(
    "base_url, reason",
    [
        ("file:///etc/passwd", "must use https"),
        ("ftp://127.0.0.1/v1", "must use https"),
        ("http://example.invalid/v1", "must use https"),
        ("http://192.0.2.1:8000/v1", "must use https"),
        ("http://localhost.example.invalid/v1", "must use https"),
        ("http://0.0.0.0:8000/v1", "must use https"),
        ("https:///v1", "must use https"),
        ("https://user:pw@api.example.invalid/v1", "credentials"),
    ],
)
def test_endpoints_the_key_must_not_reach_are_refused_before_connecting(
    base_url, reason, monkeypatch
):
    def no_connection(*args, **kwargs):
        raise AssertionError("connected")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    with pytest.raises(RuntimeError, match=reason) as err:
        ask(base_url, timeout_s=1.0)
    assert "user:pw" not in str(err.value)


@pytest.mark.parametrize(
    "base_url",
    [
        "https://api.openai.com/v1",
        "http://localhost:11434/v1",
        "http://127.0.0.2:8000/v1",
        "http://[::1]:8080/v1",
    ],
)
def test_https_and_local_http_endpoints_are_accepted(base_url):
    assert prompts.check_endpoint(base_url).geturl() == base_url


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_an_oversized_answer_is_cut_off(declared):
    huge = completion("a" * (4 << 20))

    def respond(handler):
        handler.send_response(200)
        if declared:
            handler.send_header("Content-Length", str(len(huge)))
        handler.end_headers()  # without a length the body ends when the connection closes
        for start in range(0, len(huge), 1 << 16):
            handler.wfile.write(huge[start : start + (1 << 16)])

    with serve(respond) as (base_url, _):
        with pytest.raises(RuntimeError, match="more than 1048576 bytes"):
            ask(base_url)


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_slow_drip_server_hits_the_overall_deadline(part):
    def respond(handler):
        # A byte every 50 ms: each read is quick, so only an overall deadline stops the client.
        handler.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n")
        if part == "body":
            handler.wfile.write(b"\r\n")
        for _ in range(100):  # gives up after ~5 s if the client does not
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)

    with serve(respond) as (base_url, _):
        with pytest.raises(RuntimeError, match=r"within prompts\.timeout_s=1 s"):
            ask(base_url, timeout_s=1.0)


def scripted(statuses: list[int]):
    """A responder answering with ``statuses`` in turn (the last one repeats); 200 is an answer."""
    calls = iter(range(10**6))

    def respond(handler):
        status = statuses[min(next(calls), len(statuses) - 1)]
        body = completion(json.dumps(ANSWER)) if status == 200 else b'{"error": "busy"}'
        send(handler, status, body)

    return respond


def test_429_and_503_are_retried_with_exponential_backoff():
    waits: list[float] = []
    with serve(scripted([503, 429, 200])) as (base_url, seen):
        assert ask(base_url, sleep=waits.append) == (ANSWER["prompt"], ANSWER["negative_prompt"])
    assert waits == [0.5, 1.0]
    assert [r["authorization"] for r in seen] == [f"Bearer {KEY}"] * 3


def test_retries_are_bounded_by_attempts_and_by_the_deadline():
    waits: list[float] = []
    with serve(scripted([503])) as (base_url, seen):
        with pytest.raises(RuntimeError, match="HTTP 503 after 3 attempt"):
            ask(base_url, max_attempts=3, sleep=waits.append)
    assert waits == [0.5, 1.0] and len(seen) == 3
    waits.clear()
    with serve(scripted([502])) as (base_url, seen):
        # 0.5 s fits in the 1 s deadline, the next wait of 1 s no longer does.
        with pytest.raises(RuntimeError, match="HTTP 502 after 2 attempt"):
            ask(base_url, timeout_s=1.0, sleep=waits.append)
    assert waits == [0.5] and len(seen) == 2
    waits.clear()
    with serve(scripted([404])) as (base_url, seen):
        with pytest.raises(RuntimeError, match="HTTP 404 after 1 attempt"):
            ask(base_url, sleep=waits.append)
    assert waits == [] and len(seen) == 1


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"<html>Bad gateway</html>", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[]", "without a 'choices' list"),
        (b'{"choices": []}', "without a 'choices' list"),
        (b'{"choices": [{"text": "a crack"}]}', r"without a text choices\[0\]\.message\.content"),
        (b'{"choices": [{"message": {"content": 5}}]}', "without a text choices"),
        (completion("I cannot help with that."), "could not find a prompt"),
        (completion('{"prompt": 1, "negative_prompt": "blurry"}'), "could not find a prompt"),
    ],
)
def test_a_malformed_answer_is_a_clear_error(body, problem):
    with serve(lambda h: send(h, 200, body)) as (base_url, _):
        with pytest.raises(RuntimeError, match=problem) as err:
            ask(base_url)
    assert f"LLM endpoint {base_url}/chat/completions " in str(err.value)
    assert "'metal_nut'" in str(err.value)


def test_brace_heavy_answers_parse_in_one_pass():
    inner = json.dumps({"prompt": "a {curly} crack", "negative_prompt": 'clean, "quoted" }'})
    assert prompts.parse_llm_answer("{" * 40_000 + inner) == (
        "a {curly} crack",
        'clean, "quoted" }',
    )
    nested = '{"a": ' * 5_000 + "1" + "}" * 5_000  # deeper than json's recursion limit
    assert prompts.parse_llm_answer(nested + "\n" + inner) == (
        "a {curly} crack",
        'clean, "quoted" }',
    )
    labelled = "{" * 40_000 + "\nPrompt: rust\nNegative prompt: clean"
    assert prompts.parse_llm_answer(labelled) == ("rust", "clean")
    with pytest.raises(ValueError, match=r"could not find .* \(40000 characters\)"):
        prompts.parse_llm_answer("{" * 40_000)
    content = "{" * 40_000 + json.dumps(ANSWER)
    with serve(lambda h: send(h, 200, completion(content))) as (base_url, _):
        assert ask(base_url) == (ANSWER["prompt"], ANSWER["negative_prompt"])


def test_the_key_appears_in_no_error_log_or_cache(tmp_path, monkeypatch, caplog, capfd):
    """Every path that can report: success, cache, redirect, retries, echo, bad answers."""
    monkeypatch.setenv("FMAS_TEST_KEY", KEY)
    errors: list[str] = []
    echo = completion(f"Prompt: your key is {KEY}\nNegative prompt: Bearer {KEY}")
    responders = [  # (respond, timeout_s)
        (scripted([200]), 5.0),
        (scripted([503, 500]), 1.0),  # one real 0.5 s wait, then the deadline ends the retries
        (lambda h: send(h, 302, b"", Location=f"http://127.0.0.1:1/?key={KEY}"), 5.0),
        (lambda h: send(h, 200, echo), 5.0),
        (lambda h: send(h, 200, f"Authorization: Bearer {KEY}".encode()), 5.0),
        (lambda h: h.wfile.write(f"HTTP/1.0 {KEY}\r\n\r\n".encode()), 5.0),
    ]
    with caplog.at_level(logging.DEBUG):
        for index, (respond, timeout_s) in enumerate(responders):
            with serve(respond) as (base_url, seen):
                kwargs = dict(
                    llm_base_url=base_url,
                    llm_model="test-model",
                    api_key_env="FMAS_TEST_KEY",
                    cache_dir=tmp_path / "cache",
                    timeout_s=timeout_s,
                )
                try:
                    pair = prompts.get_prompts(f"class_{index}", **kwargs)
                    assert prompts.get_prompts(f"class_{index}", **kwargs).source == "llm-cache"
                    errors.append(repr(pair))
                except RuntimeError as error:
                    errors.append(error_text(error))
            assert seen and all(r["authorization"] == f"Bearer {KEY}" for r in seen)
    assert len(errors) == len(responders) and "Traceback" in errors[-1]
    out, err = capfd.readouterr()
    for where, text in [("errors", "\n".join(errors)), ("log", caplog.text), ("out", out + err)]:
        assert KEY not in text, where
    cached = list((tmp_path / "cache").iterdir())
    assert [p.name for p in cached] == ["class_0.json"]
    assert all(KEY.encode() not in p.read_bytes() for p in cached)
