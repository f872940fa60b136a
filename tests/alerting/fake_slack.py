"""A Slack Web API on 127.0.0.1 that plays ``chat.postMessage`` and ``chat.update``.

The real ``slack_sdk.WebClient`` talks to it over HTTP (``base_url=fake.base_url``), so a
test sees what Slack would receive: the method, the JSON or form body and the
``Authorization`` header. It keeps the messages it was sent, so a test can check what the
channel shows after an update, and checks the Block Kit limits that make the real Slack
answer ``invalid_blocks``. Failures are scripted with :meth:`FakeSlack.fail_next` and
:meth:`FakeSlack.stall_next`.

>>> from slack_sdk import WebClient
>>> with FakeSlack() as slack:
...     client = WebClient(token="xoxb-test", base_url=slack.base_url, retry_handlers=[])
...     resp = client.chat_postMessage(channel="#alerts", text="hi")
...     (resp["channel"], slack.requests[0].method, slack.requests[0].authorization)
('C0001', 'chat.postMessage', 'Bearer xoxb-test')
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


@dataclass(frozen=True)
class SlackRequest:
    """One request as the fake received it."""

    method: str
    """The API method: ``chat.postMessage``, ``chat.update``."""
    body: dict[str, Any]
    """The JSON body, or the form body (one value per field)."""
    authorization: str | None
    status: int
    """The HTTP status the fake answered."""
    response: dict[str, Any]
    """The JSON the fake answered."""


@dataclass
class SlackMessage:
    """A message as the channel shows it now."""

    channel: str
    ts: str
    text: str | None
    blocks: list[dict[str, Any]] | None
    thread_ts: str | None = None
    reply_broadcast: bool = False
    updates: int = 0
    replies: list[str] = field(default_factory=list)
    """The ts of the replies in this message's thread."""


@dataclass(frozen=True)
class _Failure:
    status: int
    error: str
    retry_after: float | None
    delay: float


class FakeSlack:
    """A capturing Slack Web API; a context manager that serves while it is open.

    ``token``, when given, is the only bot token accepted (others get ``invalid_auth``,
    none gets ``not_authed``). Channel names map to ids ``C0001``, ``C0002`` ... in order of
    first use; a name that already looks like an id (``C``/``G``/``D`` + capitals and
    digits) is its own id.
    """

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self._lock = threading.Lock()
        self._requests: list[SlackRequest] = []
        self._script: deque[_Failure] = deque()
        self._channels: dict[str, str] = {}
        self._messages: dict[str, SlackMessage] = {}
        self._ts = 0
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> FakeSlack:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # bounds close()
            name="fake-slack",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; stalled requests are let go at once."""
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/api/``, for ``WebClient(base_url=...)``."""
        if self._server is None:
            raise RuntimeError("FakeSlack is not started")
        return f"http://127.0.0.1:{self._server.server_port}/api/"

    # ---- scripting

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 500,
        error: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``n`` requests with ``{"ok": false, "error": error}`` and HTTP
        ``status``: 500/503 for an outage, 429 for a rate limit (``Retry-After:
        retry_after``), 200 for an API error such as ``channel_not_found``."""
        if error is None:
            error = {429: "ratelimited", 200: "channel_not_found"}.get(status, "fatal_error")
        with self._lock:
            self._script.extend(_Failure(status, error, retry_after, 0.0) for _ in range(n))

    def stall_next(self, n: int = 1, *, seconds: float = 5.0) -> None:
        """Hold the next ``n`` requests ``seconds`` before answering them normally, so that a
        client with a shorter timeout gives up."""
        with self._lock:
            self._script.extend(_Failure(0, "", None, seconds) for _ in range(n))

    # ---- what happened

    @property
    def requests(self) -> list[SlackRequest]:
        """Every request so far, failed ones included, in arrival order."""
        with self._lock:
            return list(self._requests)

    def calls(self, method: str) -> list[SlackRequest]:
        """The requests to one API method."""
        return [r for r in self.requests if r.method == method]

    def message(self, ref: str) -> SlackMessage:
        """The message ``"<channel_id>:<ts>"`` as the channel shows it now."""
        with self._lock:
            return self._messages[ref]

    @property
    def messages(self) -> list[SlackMessage]:
        """Every message posted, replies included, oldest first."""
        with self._lock:
            return list(self._messages.values())

    # ---- the API

    def _handle(self, method: str, body: dict[str, Any], auth: str | None) -> tuple[int, Any, dict]:
        """(status, JSON response, extra headers) for one request."""
        with self._lock:
            step = self._script.popleft() if self._script else None
        if step is not None and step.delay:
            self._closing.wait(step.delay)
            step = None
        headers: dict[str, str] = {}
        if step is not None:
            if step.retry_after is not None:
                headers["Retry-After"] = f"{step.retry_after:g}"
            status, resp = step.status, {"ok": False, "error": step.error}
        else:
            status, resp = 200, self._answer(method, body, auth)
        with self._lock:
            self._requests.append(SlackRequest(method, body, auth, status, resp))
        return status, resp, headers

    def _answer(self, method: str, body: dict[str, Any], auth: str | None) -> dict[str, Any]:
        token = auth.removeprefix("Bearer ").strip() if auth else body.get("token")
        if not token:
            return {"ok": False, "error": "not_authed"}
        if self.token is not None and token != self.token:
            return {"ok": False, "error": "invalid_auth"}
        if method not in ("chat.postMessage", "chat.update"):
            return {"ok": False, "error": "unknown_method"}
        if not body.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        if not body.get("text") and not body.get("blocks"):
            return {"ok": False, "error": "no_text"}
        blocks = body.get("blocks")
        if isinstance(blocks, str):  # form bodies carry blocks as a JSON string
            blocks = json.loads(blocks)
        problem = block_kit_problem(blocks) if blocks is not None else None
        if problem:
            return {"ok": False, "error": "invalid_blocks", "errors": [problem]}
        with self._lock:
            channel = self._channel_id(str(body["channel"]))
            if method == "chat.update":
                msg = self._messages.get(f"{channel}:{body.get('ts')}")
                if msg is None:
                    return {"ok": False, "error": "message_not_found"}
                msg.text, msg.blocks = body.get("text"), blocks
                msg.updates += 1
                return {"ok": True, "channel": channel, "ts": msg.ts, "text": msg.text}
            thread_ts = body.get("thread_ts")
            if thread_ts is not None:
                parent = self._messages.get(f"{channel}:{thread_ts}")
                if parent is None:
                    return {"ok": False, "error": "thread_not_found"}
            self._ts += 1
            ts = f"1700000000.{self._ts:06d}"
            msg = SlackMessage(
                channel=channel,
                ts=ts,
                text=body.get("text"),
                blocks=blocks,
                thread_ts=thread_ts,
                reply_broadcast=body.get("reply_broadcast") in (True, "1", "true"),
            )
            self._messages[f"{channel}:{ts}"] = msg
            if thread_ts is not None:
                parent.replies.append(ts)
        answer = {"text": msg.text, "ts": ts, "blocks": blocks, "thread_ts": thread_ts}
        return {"ok": True, "channel": channel, "ts": ts, "message": answer}

    def _channel_id(self, name: str) -> str:
        if name[:1] in "CGD" and name[1:].isalnum() and name.isupper():
            return name
        return self._channels.setdefault(name, f"C{len(self._channels) + 1:04d}")


def block_kit_problem(blocks: Any) -> str | None:
    """The first Block Kit limit ``blocks`` breaks (as Slack would refuse it), or None."""
    if not isinstance(blocks, list) or len(blocks) > 50:
        return "blocks must be a list of at most 50 blocks"
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        text = (block.get("text") or {}).get("text", "") if isinstance(block, dict) else ""
        if kind == "header" and (block["text"].get("type") != "plain_text" or len(text) > 150):
            return f"blocks[{i}]: a header is plain_text of at most 150 characters"
        if kind == "section" and len(text) > 3000:
            return f"blocks[{i}]: a section's text has at most 3000 characters"
        if kind == "context" and len(block.get("elements", [])) > 10:
            return f"blocks[{i}]: a context has at most 10 elements"
        if kind == "actions":
            elements = block.get("elements", [])
            if not 1 <= len(elements) <= 25:
                return f"blocks[{i}]: an actions block has 1 to 25 elements"
            ids = [e.get("action_id") for e in elements]
            if len(set(ids)) != len(ids):
                return f"blocks[{i}]: action_ids must be unique"
            for j, e in enumerate(elements):
                if e.get("type") == "button" and (
                    len(e.get("text", {}).get("text", "")) > 75
                    or len(e.get("value", "")) > 2000
                    or e.get("style") not in (None, "primary", "danger")
                ):
                    return f"blocks[{i}].elements[{j}]: a button breaks Slack's limits"
        if kind not in ("header", "section", "context", "actions", "divider"):
            return f"blocks[{i}]: unsupported block type {kind!r}"
    return None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeSlack
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            body = json.loads(raw or b"{}")
        else:
            body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        method = self.path.split("?")[0].rsplit("/", 1)[-1]
        status, resp, headers = self.fake._handle(method, body, self.headers.get("Authorization"))
        data = json.dumps(resp).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        # The client may have given up on a stalled request.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet under pytest
        pass
