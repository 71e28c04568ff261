"""A judge behind an OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, a hosted API).

    judge = ServerJudge("http://localhost:8000/v1", "Qwen/Qwen2.5-7B-Instruct", cache_path=out / "judge_cache.jsonl")
    replies = judge([messages, messages, ...])      # the callable data.prepare.llm_stage expects

Requests run concurrently on threads (standard library HTTP only). Each request has a timeout; 429, 5xx,
timeouts, dropped connections and malformed replies are retried with exponential backoff (a server's
Retry-After is honoured). Every reply is appended to a cache file as soon as it arrives, keyed by a hash of
the request body, so a rerun after a crash or an outage sends no request whose reply was received before.
The API key is read from an environment variable at request time and is never stored in an attribute,
the cache, run.json or an error message.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# a request the server refuses for this record alone (e.g. vLLM answers 400 when the prompt is longer than the
# model's context): the record is rejected with the server's message, the run goes on
RECORD_REFUSED_STATUS = {400, 413, 422}
REFUSED_PREFIX = "judge request refused by the server"


class JudgeUnavailable(RuntimeError):
    """The server could not answer after all retries, or refused the whole run (bad key, URL or model)."""


class NotSent(JudgeUnavailable):
    """A queued request dropped because another one failed for good."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would resend the Authorization header to wherever they point."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


@dataclass
class JudgeCounters:
    requests: int = 0  # HTTP requests sent, retries included
    cached: int = 0  # replies taken from the cache instead of the server
    retries: int = 0
    refused: int = 0  # requests refused for their record (HTTP 400/413/422)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "cached": self.cached, "retries": self.retries, "refused": self.refused}


def chat_completions_url(base_url: str) -> str:
    """`http://host:8000/v1` -> `http://host:8000/v1/chat/completions`; a full endpoint URL is kept."""
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--judge-url {base_url!r} must start with http:// or https:// "
                         "(e.g. http://localhost:8000/v1)")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class ReplyCache:
    """Append-only JSONL of {"key", "reply"}: one flushed line per reply, a half-written last line is ignored."""

    def __init__(self, path: Path | None):
        self.path, self.replies, self.lock = path, {}, threading.Lock()
        if path is not None and path.is_file():
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        obj = json.loads(raw)
                        self.replies[obj["key"]] = obj["reply"]
                    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                        continue  # the process died while writing this line: that request is simply sent again
            with open(path, "rb+") as f:  # cut a half-written tail so the next append starts on a fresh line
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)

    def get(self, key: str):
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.replies[key] = reply
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())


class ServerJudge:
    """callable(list of chat-message lists) -> list of reply texts, in order, via chat-completions requests."""

    def __init__(self, base_url: str, model: str, *, concurrency: int = 8, timeout: float = 120.0,
                 retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0, max_tokens: int = 384,
                 api_key_env: str = "OPENAI_API_KEY", cache_path: str | Path | None = None):
        if concurrency < 1 or timeout <= 0 or retries < 0:
            raise ValueError("--judge-concurrency must be >= 1, --judge-timeout > 0 and --judge-retries >= 0")
        self.url = chat_completions_url(base_url)
        # a server on this machine is reached directly: an HTTP(S)_PROXY from the environment could not reach it
        host = urllib.parse.urlsplit(self.url).hostname or ""
        self._opener = urllib.request.build_opener(
            _NoRedirect, *([urllib.request.ProxyHandler({})] if host in ("localhost", "127.0.0.1", "::1") else []))
        self.model, self.concurrency, self.timeout, self.retries = model, concurrency, timeout, retries
        self.backoff, self.max_backoff, self.max_tokens = backoff, max_backoff, max_tokens
        self.api_key_env = api_key_env  # the name only; the value is read per request and never kept
        self.cache = ReplyCache(Path(cache_path) if cache_path is not None else None)
        self.counters = JudgeCounters()
        self._stop = threading.Event()  # set on a fatal error: queued requests are not sent

    def request_body(self, messages: list[dict]) -> dict:
        return {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}

    @staticmethod
    def cache_key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def __call__(self, prompts: list[list[dict]]) -> list[str]:
        bodies = [self.request_body(m) for m in prompts]
        keys = [self.cache_key(b) for b in bodies]
        replies: list = [self.cache.get(k) for k in keys]
        self.counters.add("cached", sum(r is not None for r in replies))
        todo = [i for i, r in enumerate(replies) if r is None]
        errors: list[JudgeUnavailable] = []
        self._stop.clear()
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
                futures = {i: pool.submit(self._ask_and_cache, bodies[i], keys[i]) for i in todo}
                for i, fut in futures.items():
                    try:
                        replies[i] = fut.result()
                    except JudgeUnavailable as e:  # the others still finish, and their replies are kept
                        errors.append(e)
        if errors:
            done = len(todo) - len(errors)
            cause = next((e for e in errors if not isinstance(e, NotSent)), errors[0])
            raise JudgeUnavailable(f"{cause} ({len(errors)} of {len(todo)} requests in this batch failed; "
                                   f"the {done} replies received are cached)")
        return replies

    # ------------------------------------------------------------------ one request, with retries
    def _ask_and_cache(self, body: dict, key: str) -> str:
        reply = self._ask(body)
        self.cache.put(key, reply)  # at once, on the worker: a reply received is never paid for again
        return reply

    def _ask(self, body: dict) -> str:
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise NotSent("not sent: an earlier request failed for good")
            if attempt:
                self.counters.add("retries")
            wait = None
            self.counters.add("requests")
            try:
                status, headers, raw = self._post(payload)
            except (TimeoutError, socket.timeout):
                last = f"no reply within --judge-timeout {self.timeout:g} s"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                last = (f"no reply within --judge-timeout {self.timeout:g} s" if isinstance(reason, TimeoutError)
                        else f"cannot reach {self.url}: {reason}")
            else:
                if status == 200:
                    text = _reply_text(raw)
                    if text is not None:
                        return text
                    last = f"malformed reply (HTTP 200 but not a chat completion): {raw[:200]!r}"
                elif status in RECORD_REFUSED_STATUS:
                    self.counters.add("refused")
                    return f"{REFUSED_PREFIX} (HTTP {status}): {_server_message(raw)}"
                elif status in RETRY_STATUS:
                    last = f"HTTP {status} from {self.url}: {_server_message(raw)}"
                    wait = _retry_after(headers)
                else:  # 401/403 (key), 404 (URL or model name), ...: every request would fail the same way
                    self._stop.set()
                    hint = {401: f"check the API key in ${self.api_key_env}",
                            403: f"check the API key in ${self.api_key_env}",
                            404: "check --judge-url (it should end in /v1) and --judge-model (the served name)",
                            **dict.fromkeys((301, 302, 303, 307, 308), "the server redirects: pass the URL it "
                                            "redirects to (redirects are not followed, so the key never moves)")}
                    raise JudgeUnavailable(f"HTTP {status} from {self.url}: {_server_message(raw)}"
                                           + (f"; {hint[status]}" if status in hint else ""))
            if attempt < self.retries:
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
                time.sleep(min(self.max_backoff, wait) if wait is not None else delay)
        raise JudgeUnavailable(f"judge server failed after {self.retries + 1} attempts: {last}")

    def _post(self, payload: bytes):
        """(status, headers, body bytes). The whole reply must arrive within the timeout."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout
        try:
            resp = self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers, _read_until(e, deadline, self.timeout)
        with resp:
            return resp.status, resp.headers, _read_until(resp, deadline, self.timeout)


def _read_until(resp, deadline: float, timeout: float) -> bytes:
    """Read the body in chunks so a server that trickles bytes cannot outlast the timeout."""
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reply not complete within {timeout:g} s")
        chunk = resp.read(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reply_text(raw: bytes) -> str | None:
    """choices[0].message.content of a chat completion, or None when the body is not one."""
    try:
        obj = json.loads(raw)
        content = obj["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else ("" if content is None else None)


def _server_message(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:300]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:300].decode("utf-8", "replace")


def _retry_after(headers) -> float | None:
    try:
        value = float(headers.get("Retry-After")) if headers is not None and headers.get("Retry-After") else None
    except (TypeError, ValueError):
        return None
    return max(0.0, value) if value is not None else None
