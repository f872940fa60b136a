"""Bad input: a clear 4xx with ``{"error": reason, "detail": message}``, never a 500.

Every case seeds a run, takes a snapshot of what the API shows of the stored
data, sends one bad request and checks the status, the reason and a fragment
of the message that names what is wrong; then the snapshot must be unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgpack
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from runwatch import wire
from runwatch.db import make_engine
from tests.conftest import Collector, start_collector

INGEST = "/api/v1/ingest"
MISSING_RUN = 999_999
SMALL_BODY = 1024
SMALL_BATCH = 5
MAX_DETAIL = 500
"""A message explains; it does not echo the body back."""

REASON_OF_STATUS = {400: "malformed_body", 404: "not_found", 413: "payload_too_large"}
REASON_OF_STATUS |= {415: "unsupported_media_type", 422: "invalid"}

RUN: Any = object()
"""Stands for the seeded run's id in a batch document."""
DROP: Any = object()
"""A field given this value is left out of the batch."""

Encoder = Callable[[int], bytes]
"""Builds a request body for the seeded run's id."""

_projects = itertools.count()


# -- servers -----------------------------------------------------------------------
@contextmanager
def private_postgres(url: str) -> Iterator[str]:
    """A database of its own on the test server, dropped afterwards."""
    name = f"runwatch_test_{uuid.uuid4().hex[:10]}"
    admin = make_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Collector]:
    """One collector per database for the table-driven cases.

    A collector per case costs ~0.4 s; each case seeds and checks a run of its
    own, so one server serves them all. PostgreSQL gets a database of its own
    because the per-test ``db_url`` fixture truncates the session one.
    """
    if request.param == "sqlite":
        yield from start_collector(f"sqlite:///{tmp_path_factory.mktemp('shared') / 'rw.db'}")
        return
    with private_postgres(request.getfixturevalue("postgres_url")) as url:
        yield from start_collector(url)


@pytest.fixture
def server(shared: Collector) -> Iterator[Collector]:
    """The shared collector with an HTTP client of this case's own."""
    with httpx.Client(base_url=shared.url, timeout=30) as http:
        yield dataclasses.replace(shared, http=http)


@pytest.fixture
def limited(db_url: str) -> Iterator[Collector]:
    """A collector with small body and batch limits."""
    yield from start_collector(db_url, max_body_bytes=SMALL_BODY, max_points_per_batch=SMALL_BATCH)


# -- data --------------------------------------------------------------------------
def seed(collector: Collector, project: str | None = None) -> int:
    """A run with three series on two ranks, NaN and Inf included; returns its id."""
    project = project or f"case-{next(_projects)}"
    with collector.client() as client:
        run = client.create_run(project, "seeded", config={"lr": 3e-4}, tags=["baseline"])["id"]
        client.ingest(run, [(s, 1000.0 + s, "loss", 2.0 - s / 10) for s in range(4)], seq=0)
        client.ingest(run, [(0, 1000.0, "lr", 0.1), (1, 1001.0, "grad_norm", math.nan)], seq=1)
        client.ingest(run, [(0, 1000.0, "loss", math.inf)], seq=0, rank=1)
    return run


def snapshot(http: httpx.Client, run: int) -> dict[str, Any]:
    """What the API shows of the stored data: every run, and the run's series and points."""

    def get(path: str, **params: Any) -> Any:
        reply = http.get(path, params=params)
        assert reply.status_code == 200, reply.text
        return reply.json()

    series = get(f"/api/v1/runs/{run}/series")
    return {
        "runs": get("/api/v1/runs", limit=1000),
        "series": series,
        "points": [
            get(f"/api/v1/runs/{run}/metrics", key=s["key"], rank=s["rank"]) for s in series
        ],
    }


def assert_refused(reply: httpx.Response, status: int, reason: str, fragment: str) -> str:
    """The reply is ``status`` with the error shape, ``reason`` and ``fragment``; the detail."""
    assert reply.status_code == status, reply.text[:MAX_DETAIL]
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == reason, body
    assert fragment in body["detail"], body
    assert len(body["detail"]) <= MAX_DETAIL, body["detail"][:MAX_DETAIL]
    return body["detail"]


def _fill(doc: Any, run: int) -> Any:
    if doc is RUN:
        return run
    if isinstance(doc, dict):
        return {k: _fill(v, run) for k, v in doc.items() if v is not DROP}
    if isinstance(doc, list):
        return [_fill(v, run) for v in doc]
    return doc


def batch(**fields: Any) -> dict[str, Any]:
    """A valid one-point batch for the seeded run at seq 100, with ``fields`` replaced."""
    doc: dict[str, Any] = {"run": RUN, "rank": 0, "seq": 100, "points": [[10, 2000.0, "loss", 0.5]]}
    return doc | fields


def point(step: Any = 11, wall_time: Any = 2001.0, key: Any = "loss", value: Any = 0.25) -> Any:
    """A batch whose second point (``points[1]``) is built from the arguments."""
    return batch(points=[[10, 2000.0, "loss", 0.5], [step, wall_time, key, value]])


def mp(doc: Any) -> Encoder:
    return lambda run: msgpack.packb(_fill(doc, run), use_bin_type=True)


def js(doc: Any) -> Encoder:
    return lambda run: orjson.dumps(_fill(doc, run))


def raw(data: bytes) -> Encoder:
    return lambda run: data


def cut(encoder: Encoder, n: int) -> Encoder:
    """The body without its last ``n`` bytes."""
    return lambda run: encoder(run)[:-n]


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad ingest request and the refusal it must get."""

    body: Encoder
    status: int
    fragment: str
    content_type: str = wire.MSGPACK
    absent: str | None = None
    """A phrase the message must not contain (because it is false)."""

    @property
    def reason(self) -> str:
        return REASON_OF_STATUS[self.status]


# fmt: off
INGEST_CASES = [
    # -- wrong types and out-of-range numbers ------------------------------------------
    # step sent as a string
    pytest.param(Bad(mp(point(step="11")), 422, "points[1][0] (step) must be an integer >= 0, not '11'"), id="step-string"),  # noqa: E501
    # a negative step
    pytest.param(Bad(mp(point(step=-1)), 422, "points[1][0] (step) must be an integer >= 0, not -1"), id="step-negative"),  # noqa: E501
    # a whole float is still not an integer step
    pytest.param(Bad(mp(point(step=11.0)), 422, "points[1][0] (step) must be an integer"), id="step-float"),  # noqa: E501
    # bool is not a number on the wire, though Python says True == 1
    pytest.param(Bad(mp(point(step=True)), 422, "points[1][0] (step) must be an integer"), id="step-bool"),  # noqa: E501
    # a step past int64 (msgpack uint64)
    pytest.param(Bad(mp(point(step=2**64 - 1)), 422, "points[1][0] (step)"), id="step-uint64"),
    # a bool value
    pytest.param(Bad(mp(point(value=True)), 422, "points[1][3] (value) must be a number"), id="value-bool"),  # noqa: E501
    # a value wrapped in a list
    pytest.param(Bad(mp(point(value=[0.25])), 422, "points[1][3] (value) must be a number"), id="value-list"),  # noqa: E501
    # a numeric string: only "NaN", "Infinity" and "-Infinity" may be strings
    pytest.param(Bad(mp(point(value="0.25")), 422, "'NaN', 'Infinity', '-Infinity', not '0.25'"), id="value-string"),  # noqa: E501
    # JSON spells NaN "NaN", not "nan"
    pytest.param(Bad(js(point(value="nan")), 422, "points[1][3] (value)", wire.JSON), id="value-json-lowercase-nan"),  # noqa: E501
    # wall_time NaN
    pytest.param(Bad(mp(point(wall_time=math.nan)), 422, "points[1][1] (wall_time) must be a finite number"), id="wall-time-nan"),  # noqa: E501
    # wall_time infinite
    pytest.param(Bad(mp(point(wall_time=math.inf)), 422, "points[1][1] (wall_time) must be a finite number"), id="wall-time-inf"),  # noqa: E501
    # wall_time before the epoch, as an integer
    pytest.param(Bad(mp(point(wall_time=-1)), 422, "points[1][1] (wall_time) must be a finite number of seconds since the epoch, not -1"), id="wall-time-negative-int"),  # noqa: E501
    # wall_time before the epoch, as a float
    pytest.param(Bad(mp(point(wall_time=-1.0)), 422, "points[1][1] (wall_time) must be a finite number of seconds since the epoch, not -1.0"), id="wall-time-negative-float"),  # noqa: E501
    # wall_time as a string
    pytest.param(Bad(mp(point(wall_time="2001")), 422, "points[1][1] (wall_time)"), id="wall-time-string"),  # noqa: E501
    # a wall time years ahead of the collector's clock would stay "latest" for good
    pytest.param(Bad(mp(point(wall_time=4e9)), 422, "points[1][1] (wall_time) 4000000000.0 is more than 86400 s ahead"), id="wall-time-future"),  # noqa: E501
    # a heartbeat from the future
    pytest.param(Bad(mp(batch(heartbeat=1e12)), 422, "heartbeat 1000000000000.0 is more than 86400 s ahead"), id="heartbeat-future"),  # noqa: E501
    # one key per point, each a value baked into the name
    pytest.param(Bad(mp(batch(points=[[1, 2000.0, f"loss@{i}", 0.5] for i in range(10_001)])), 422, "more than 10000 distinct keys"), id="too-many-keys"),  # noqa: E501
    # the run id as a string
    pytest.param(Bad(mp(batch(run="1")), 422, "run must be an integer in [1, 2147483647], not '1'"), id="run-string"),  # noqa: E501
    # run ids start at 1
    pytest.param(Bad(mp(batch(run=0)), 422, "run must be an integer in [1,"), id="run-zero"),
    # a negative rank
    pytest.param(Bad(mp(batch(rank=-1)), 422, "rank must be an integer in [0, 2147483647], not -1"), id="rank-negative"),  # noqa: E501
    # a rank past int32
    pytest.param(Bad(mp(batch(rank=2**31)), 422, "rank must be an integer in [0, 2147483647]"), id="rank-int32"),  # noqa: E501
    # seq as a float
    pytest.param(Bad(mp(batch(seq=100.0)), 422, "seq must be an integer in [0, 9223372036854775807], not 100.0"), id="seq-float"),  # noqa: E501
    # a negative seq
    pytest.param(Bad(mp(batch(seq=-1)), 422, "seq must be an integer in [0,"), id="seq-negative"),
    # heartbeat NaN
    pytest.param(Bad(mp(batch(heartbeat=math.nan)), 422, "heartbeat must be a finite number"), id="heartbeat-nan"),  # noqa: E501
    # -- missing and unknown fields ------------------------------------------------------
    # no run
    pytest.param(Bad(mp(batch(run=DROP)), 422, "missing field 'run'"), id="missing-run"),
    # no rank
    pytest.param(Bad(mp(batch(rank=DROP)), 422, "missing field 'rank'"), id="missing-rank"),
    # no seq
    pytest.param(Bad(mp(batch(seq=DROP)), 422, "missing field 'seq'"), id="missing-seq"),
    # no points
    pytest.param(Bad(mp(batch(points=DROP)), 422, "missing field 'points'"), id="missing-points"),
    # a field the wire does not have
    pytest.param(Bad(mp(batch(sequence=1)), 422, "unknown field(s) sequence; a batch has heartbeat, points, rank, run, seq"), id="unknown-field"),  # noqa: E501
    # -- shapes --------------------------------------------------------------------------
    # the body is an array, not a map
    pytest.param(Bad(mp([RUN, 0, 100, []]), 422, "batch must be a map, not an array"), id="body-array"),  # noqa: E501
    # the body is a bare string
    pytest.param(Bad(mp("batch"), 422, "batch must be a map, not a string"), id="body-string"),
    # the body is JSON null
    pytest.param(Bad(js(None), 422, "batch must be a map, not null", wire.JSON), id="body-null"),
    # points is a map
    pytest.param(Bad(mp(batch(points={"loss": 1.0})), 422, "points must be an array, not a map"), id="points-map"),  # noqa: E501
    # a point with three elements
    pytest.param(Bad(mp(batch(points=[[10, 2000.0, "loss"]])), 422, "points[0] must be an array of 4, [step, wall_time, key, value]; got 3 elements"), id="point-3-elements"),  # noqa: E501
    # a point that is a number
    pytest.param(Bad(mp(batch(points=[[10, 2000.0, "loss", 0.5], 7])), 422, "points[1] must be an array of 4, [step, wall_time, key, value]; got int"), id="point-number"),  # noqa: E501
    # a point with five elements: the message must not claim it is not an array
    pytest.param(Bad(mp(batch(points=[[10, 2000.0, "loss", 0.5, 1]])), 422, "points[0]", absent="not an array"), id="point-5-elements"),  # noqa: E501
    # -- keys ----------------------------------------------------------------------------
    # a key that is a number
    pytest.param(Bad(mp(point(key=7)), 422, "points[1][2] (key) must be a string, not int"), id="key-number"),  # noqa: E501
    # an empty key
    pytest.param(Bad(mp(point(key="")), 422, "points[1][2] (key) must be 1-256 characters, not 0"), id="key-empty"),  # noqa: E501
    # a 10,000-character key (an f-string of a tensor)
    pytest.param(Bad(mp(point(key="k" * 10_000)), 422, "points[1][2] (key) must be 1-256 characters, not 10000"), id="key-10000-chars"),  # noqa: E501
    # a key ending in a newline
    pytest.param(Bad(mp(point(key="loss\n")), 422, "points[1][2] (key) 'loss\\n' contains control characters"), id="key-newline"),  # noqa: E501
    # a NUL in a key (PostgreSQL text cannot hold it)
    pytest.param(Bad(mp(point(key="lo\x00ss")), 422, "contains control characters"), id="key-nul"),
    # an ANSI colour escape in a key
    pytest.param(Bad(mp(point(key="\x1b[31mloss")), 422, "contains control characters"), id="key-ansi-escape"),  # noqa: E501
    # a key that is a list
    pytest.param(Bad(mp(point(key=["loss"])), 422, "points[1][2] (key) must be a string, not an array"), id="key-list"),  # noqa: E501
    # a key that is a map
    pytest.param(Bad(mp(point(key={"k": 1})), 422, "points[1][2] (key) must be a string, not a map"), id="key-map"),  # noqa: E501
    # -- a run that does not exist -------------------------------------------------------
    pytest.param(Bad(mp(batch(run=MISSING_RUN)), 404, f"unknown run {MISSING_RUN}"), id="unknown-run"),  # noqa: E501
    # -- bodies that do not decode -------------------------------------------------------
    # truncated msgpack
    pytest.param(Bad(cut(mp(point()), 3), 400, "cannot decode application/msgpack body"), id="msgpack-truncated"),  # noqa: E501
    # bytes after the end of the msgpack map
    pytest.param(Bad(lambda run: mp(batch())(run) + b"\x00", 400, "cannot decode application/msgpack body"), id="msgpack-extra-data"),  # noqa: E501
    # a msgpack map with an integer key
    pytest.param(Bad(mp({1: RUN}), 400, "cannot decode application/msgpack body"), id="msgpack-int-map-key"),  # noqa: E501
    # a msgpack string that is not UTF-8
    pytest.param(Bad(raw(b"\x81\xa3r\xffn\x01"), 400, "cannot decode application/msgpack body"), id="msgpack-bad-utf8"),  # noqa: E501
    # an empty body
    pytest.param(Bad(raw(b""), 400, "cannot decode application/msgpack body"), id="empty-body"),
    # JSON sent as msgpack
    pytest.param(Bad(js(batch()), 400, "cannot decode application/msgpack body"), id="json-labelled-msgpack"),  # noqa: E501
    # broken JSON
    pytest.param(Bad(cut(js(point()), 5), 400, "cannot decode application/json body", wire.JSON), id="json-broken"),  # noqa: E501
    # a bare NaN token: JSON has none, the wire spells it "NaN"
    pytest.param(Bad(lambda run: b'{"run": %d, "rank": 0, "seq": 100, "points": [[1, 2.0, "loss", NaN]]}' % run, 400, "cannot decode application/json body", wire.JSON), id="json-nan-token"),  # noqa: E501
    # -- content types -------------------------------------------------------------------
    # text/plain
    pytest.param(Bad(js(batch()), 415, "unsupported content type 'text/plain': send application/msgpack or application/json", "text/plain"), id="text-plain"),  # noqa: E501
    # no content type at all
    pytest.param(Bad(mp(batch()), 415, "unsupported content type '(none)'", ""), id="no-content-type"),  # noqa: E501
    # a form post
    pytest.param(Bad(raw(b"run=1&rank=0"), 415, "'application/x-www-form-urlencoded'", "application/x-www-form-urlencoded"), id="form"),  # noqa: E501
]
# fmt: on


@pytest.mark.parametrize("case", INGEST_CASES)
def test_bad_batch_is_refused_clearly_and_changes_nothing(server: Collector, case: Bad) -> None:
    run = seed(server)
    before = snapshot(server.http, run)
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    reply = server.http.post(INGEST, content=case.body(run), headers=headers)
    assert "content-type" in reply.request.headers or not case.content_type
    detail = assert_refused(reply, case.status, case.reason, case.fragment)
    if case.absent is not None:
        assert case.absent not in detail
    assert snapshot(server.http, run) == before
    # The refused batch did not take seq 100: the good one with that seq is stored.
    good = server.post(INGEST, mp(batch())(run), wire.MSGPACK)
    assert good.status_code == 200, good.text
    assert good.json() == {"accepted": 1, "duplicate": False, "commands": []}


@pytest.mark.parametrize("content_type", [wire.MSGPACK, wire.JSON])
def test_batch_bad_only_in_its_last_point_stores_nothing_and_keeps_its_seq(
    collector: Collector, content_type: str
) -> None:
    run = seed(collector)
    before = snapshot(collector.http, run)
    good = [[s, 3000.0 + s, "loss", 1.0 / s] for s in range(10, 20)]
    good.append([20, 3020.0, "new/key", 2.0])
    encode = mp if content_type == wire.MSGPACK else js
    bad = [*good, [21, 3021.0, "loss", "oops"]]

    reply = collector.post(INGEST, encode(batch(seq=7, points=bad))(run), content_type)
    assert_refused(reply, 422, "invalid", "points[11][3] (value) must be a number")
    assert snapshot(collector.http, run) == before

    fixed = collector.post(INGEST, encode(batch(seq=7, points=good))(run), content_type)
    assert fixed.status_code == 200, fixed.text
    assert fixed.json() == {"accepted": 11, "duplicate": False, "commands": []}
    after = {(s["key"], s["rank"]): s for s in snapshot(collector.http, run)["series"]}
    assert after["loss", 0]["n_points"] == 4 + 10
    assert after["new/key", 0]["n_points"] == 1
    got = collector.http.get(
        f"/api/v1/runs/{run}/metrics", params={"key": "loss", "start": 10}
    ).json()
    assert [p[0] for p in got["points"]] == list(range(10, 20))
    again = collector.post(INGEST, encode(batch(seq=7, points=good))(run), content_type)
    assert again.json() == {"accepted": 0, "duplicate": True, "commands": []}


# -- limits --------------------------------------------------------------------------
def body_of_size(run: int, size: int) -> bytes:
    """A valid batch of up to 5 points whose msgpack encoding is exactly ``size`` bytes."""
    keys = [chr(ord("a") + i) * 150 for i in range(SMALL_BATCH)]
    while True:
        body = mp(batch(points=[[i, 2000.0 + i, k, 1.0] for i, k in enumerate(keys)]))(run)
        if len(body) >= size:
            assert len(body) == size, "cannot hit the size exactly; change the key lengths"
            return body
        shortest = min(range(len(keys)), key=lambda i: len(keys[i]))
        assert len(keys[shortest]) < wire.MAX_KEY_LENGTH, f"{size} bytes need longer keys"
        keys[shortest] += keys[shortest][0]


def chunks(body: bytes, size: int = 256) -> Iterator[bytes]:
    """``body`` as a generator, which httpx sends chunked, without Content-Length."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


def post_streamed(collector: Collector, body: bytes) -> httpx.Response:
    reply = collector.http.post(
        INGEST, content=chunks(body), headers={"Content-Type": wire.MSGPACK}
    )
    assert "content-length" not in reply.request.headers
    assert reply.request.headers["transfer-encoding"] == "chunked"
    return reply


def test_body_over_the_limit_by_content_length_is_413(limited: Collector) -> None:
    run = seed(limited)
    before = snapshot(limited.http, run)
    body = body_of_size(run, SMALL_BODY + 1)
    reply = limited.post(INGEST, body, wire.MSGPACK)
    assert_refused(
        reply, 413, "payload_too_large", f"request body is larger than the limit of {SMALL_BODY}"
    )
    assert snapshot(limited.http, run) == before


def test_streamed_body_over_the_limit_is_413_with_a_clear_message(limited: Collector) -> None:
    run = seed(limited)
    before = snapshot(limited.http, run)
    reply = post_streamed(limited, body_of_size(run, SMALL_BODY + 1))
    detail = assert_refused(
        reply, 413, "payload_too_large", f"request body is larger than the limit of {SMALL_BODY}"
    )
    assert "aaaa" not in detail
    assert snapshot(limited.http, run) == before


def test_streamed_body_over_the_limit_is_refused_and_stores_nothing(limited: Collector) -> None:
    run = seed(limited)
    before = snapshot(limited.http, run)
    reply = post_streamed(limited, body_of_size(run, SMALL_BODY + 1))
    assert reply.status_code == 413
    assert reply.json()["error"] == "payload_too_large"
    assert snapshot(limited.http, run) == before


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_body_exactly_at_the_limit_is_accepted(limited: Collector, streamed: bool) -> None:
    run = seed(limited)
    body = body_of_size(run, SMALL_BODY)
    reply = post_streamed(limited, body) if streamed else limited.post(INGEST, body, wire.MSGPACK)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"accepted": SMALL_BATCH, "duplicate": False, "commands": []}


def test_too_many_points_is_413_and_stores_nothing(limited: Collector) -> None:
    run = seed(limited)
    before = snapshot(limited.http, run)
    points = [[i, 2000.0 + i, "loss", 1.0] for i in range(SMALL_BATCH + 1)]
    reply = limited.post(INGEST, mp(batch(points=points))(run), wire.MSGPACK)
    assert_refused(
        reply, 413, "payload_too_large", f"{SMALL_BATCH + 1} elements; the limit is 5 points"
    )
    as_json = orjson.dumps(batch(points=points) | {"run": run})
    reply = limited.post(INGEST, as_json, wire.JSON)
    assert_refused(reply, 413, "payload_too_large", f"batch has {SMALL_BATCH + 1} points")
    assert snapshot(limited.http, run) == before
    reply = limited.post(INGEST, mp(batch(points=points[:SMALL_BATCH]))(run), wire.MSGPACK)
    assert reply.json() == {"accepted": SMALL_BATCH, "duplicate": False, "commands": []}


# -- the rejection counter -----------------------------------------------------------
def rejected(http: httpx.Client) -> dict[str, float]:
    """``runwatch_ingest_rejected_total`` by reason, from ``/metrics``."""
    reply = http.get("/metrics")
    assert reply.status_code == 200
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(reply.text)
        if family.name == "runwatch_ingest_rejected"
        for s in family.samples
        if s.name == "runwatch_ingest_rejected_total"
    }


def test_ingest_rejects_are_counted_by_reason(limited: Collector) -> None:
    run = seed(limited)
    assert rejected(limited.http) == {}
    sends: list[tuple[Encoder, str, int]] = [
        (mp(point(step="11")), wire.MSGPACK, 422),
        (mp(batch(sequence=1)), wire.MSGPACK, 422),
        (cut(mp(batch()), 3), wire.MSGPACK, 400),
        (js(batch()), "text/plain", 415),
        (mp(batch(run=MISSING_RUN)), wire.MSGPACK, 404),
        (mp(batch(points=[[i, 1.0, "x", 1.0] for i in range(SMALL_BATCH + 1)])), wire.MSGPACK, 413),
        (lambda run: body_of_size(run, SMALL_BODY + 1), wire.MSGPACK, 413),
    ]
    for body, content_type, status in sends:
        assert limited.post(INGEST, body(run), content_type).status_code == status
    assert post_streamed(limited, body_of_size(run, SMALL_BODY + 1)).status_code == 413
    # Refusals elsewhere, and accepted batches, are not ingest rejects.
    metrics = limited.http.get(f"/api/v1/runs/{run}/metrics", params={"key": "loss", "x": "?"})
    assert metrics.status_code == 422
    assert limited.http.post("/api/v1/runs", json={}).status_code == 422
    assert limited.post(INGEST, mp(batch())(run), wire.MSGPACK).status_code == 200
    assert limited.post(INGEST, mp(batch())(run), wire.MSGPACK).json()["duplicate"]

    assert rejected(limited.http) == {
        "invalid": 2,
        "malformed_body": 1,
        "unsupported_media_type": 1,
        "not_found": 1,
        "payload_too_large": 3,
    }


# -- run creation and finishing ------------------------------------------------------

# fmt: off
RUN_CASES = [
    # no project
    pytest.param({"name": "r"}, "body.project: Field required", id="project-missing"),
    # project null
    pytest.param({"project": None}, "body.project: Input should be a valid string", id="project-null"),  # noqa: E501
    # a slash in the project name
    pytest.param({"project": "a/b"}, "invalid project name 'a/b': use 1-128 letters", id="project-slash"),  # noqa: E501
    # a project name starting with a dot
    pytest.param({"project": ".hidden"}, "invalid project name '.hidden'", id="project-dot"),
    # an empty project name
    pytest.param({"project": ""}, "invalid project name ''", id="project-empty"),
    # a project name of 129 characters
    pytest.param({"project": "p" * 129}, "invalid project name", id="project-129-chars"),
    # a field the API does not have
    pytest.param({"project": "llm", "owner": "me"}, "body.owner: Extra inputs are not permitted", id="extra-field"),  # noqa: E501
    # tags as a string, not a list
    pytest.param({"project": "llm", "tags": "baseline"}, "body.tags: Input should be a valid list", id="tags-string"),  # noqa: E501
    # a tag that is a number
    pytest.param({"project": "llm", "tags": [1]}, "body.tags.0: Input should be a valid string", id="tags-number"),  # noqa: E501
    # a tag of 129 characters
    pytest.param({"project": "llm", "tags": ["t" * 129]}, "must be 1-128 printable characters", id="tag-129-chars"),  # noqa: E501
    # 65 tags
    pytest.param({"project": "llm", "tags": [f"t{i}" for i in range(65)]}, "at most 64 tags per run, got 65", id="tags-65"),  # noqa: E501
    # a run name of 257 characters
    pytest.param({"project": "llm", "name": "n" * 257}, "run name must be 1-256 printable characters", id="name-257-chars"),  # noqa: E501
    # an empty run name
    pytest.param({"project": "llm", "name": ""}, "run name must be 1-256 printable characters", id="name-empty"),  # noqa: E501
    # a newline in the run name
    pytest.param({"project": "llm", "name": "a\nb"}, "run name must be 1-256 printable characters", id="name-newline"),  # noqa: E501
    # config as a list
    pytest.param({"project": "llm", "config": [1]}, "body.config: Input should be a valid dictionary", id="config-list"),  # noqa: E501
    # a config integer beyond 64 bits
    pytest.param({"project": "llm", "config": {"seed": 2**64}}, "config", id="config-bigint"),
    # a world size of 0 processes
    pytest.param({"project": "llm", "world_size": 0}, "body.world_size: Input should be greater than or equal to 1", id="world-size-0"),  # noqa: E501
    # a world size that is not a whole number
    pytest.param({"project": "llm", "world_size": 1.5}, "body.world_size: Input should be a valid integer", id="world-size-float"),  # noqa: E501
]
# fmt: on


@pytest.mark.parametrize(("body", "fragment"), RUN_CASES)
def test_bad_run_creation_is_422_and_creates_nothing(
    server: Collector, body: dict[str, Any], fragment: str
) -> None:
    run = seed(server)
    before = snapshot(server.http, run)
    assert_refused(server.http.post("/api/v1/runs", json=body), 422, "invalid", fragment)
    assert snapshot(server.http, run) == before


# fmt: off
FINISH_CASES = [
    # running is not a final state
    pytest.param({"state": "running"}, "body.state: Input should be 'finished', 'failed' or 'crashed'", id="state-running"),  # noqa: E501
    # a state that does not exist
    pytest.param({"state": "done"}, "body.state: Input should be", id="state-unknown"),
    # a field the API does not have
    pytest.param({"state": "failed", "why": "oom"}, "body.why: Extra inputs are not permitted", id="extra-field"),  # noqa: E501
    # the body is a list
    pytest.param(["finished"], "body: Input should be a valid dictionary", id="body-list"),
]
# fmt: on


@pytest.mark.parametrize(("body", "fragment"), FINISH_CASES)
def test_bad_finish_is_422_and_leaves_the_run_running(
    server: Collector, body: Any, fragment: str
) -> None:
    run = seed(server)
    before = snapshot(server.http, run)
    reply = server.http.post(f"/api/v1/runs/{run}/finish", json=body)
    assert_refused(reply, 422, "invalid", fragment)
    assert snapshot(server.http, run) == before
    assert server.http.get(f"/api/v1/runs/{run}").json()["state"] == "running"


# -- queries -------------------------------------------------------------------------
# fmt: off
QUERY_CASES = [
    # x is "step" or "time"
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "x": "bogus"}, 422, "query.x: Input should be 'step' or 'time'", id="x-bogus"),  # noqa: E501
    # at least one point
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "max_points": 0}, 422, "query.max_points: Input should be greater than or equal to 1", id="max-points-0"),  # noqa: E501
    # at most 100,000 points
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "max_points": 100_001}, 422, "query.max_points: Input should be less than or equal to 100000", id="max-points-too-many"),  # noqa: E501
    # start after end
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "start": 5, "end": 1}, 422, "start (5.0) is after end (1.0)", id="start-after-end"),  # noqa: E501
    # start NaN
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "start": "nan"}, 422, "start must be a finite number, not nan", id="start-nan"),  # noqa: E501
    # end infinite
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "end": "inf"}, 422, "end must be a finite number, not inf", id="end-inf"),  # noqa: E501
    # start not a number
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "start": "yesterday"}, 422, "query.start: Input should be a valid number", id="start-word"),  # noqa: E501
    # no key
    pytest.param("/api/v1/runs/{run}/metrics", {}, 422, "query.key: Field required", id="key-missing"),  # noqa: E501
    # an empty key
    pytest.param("/api/v1/runs/{run}/metrics", {"key": ""}, 422, "query.key: String should have at least 1 character", id="key-empty"),  # noqa: E501
    # a key longer than any stored one
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "k" * 257}, 422, "query.key: String should have at most 256 characters", id="key-257-chars"),  # noqa: E501
    # a negative rank
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "loss", "rank": -1}, 422, "query.rank: Input should be greater than or equal to 0", id="rank-negative"),  # noqa: E501
    # a key the run does not have
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "nope"}, 404, "has no series 'nope' for rank 0", id="key-unknown"),  # noqa: E501
    # a key that only another rank has
    pytest.param("/api/v1/runs/{run}/metrics", {"key": "grad_norm", "rank": 1}, 404, "has no series 'grad_norm' for rank 1", id="key-other-rank"),  # noqa: E501
    # metrics of a run that does not exist
    pytest.param(f"/api/v1/runs/{MISSING_RUN}/metrics", {"key": "loss"}, 404, f"unknown run {MISSING_RUN}", id="metrics-unknown-run"),  # noqa: E501
    # series of a run that does not exist
    pytest.param(f"/api/v1/runs/{MISSING_RUN}/series", {}, 404, f"unknown run {MISSING_RUN}", id="series-unknown-run"),  # noqa: E501
    # latest of a run that does not exist
    pytest.param(f"/api/v1/runs/{MISSING_RUN}/latest", {}, 404, f"unknown run {MISSING_RUN}", id="latest-unknown-run"),  # noqa: E501
    # latest with a negative rank
    pytest.param("/api/v1/runs/{run}/latest", {"rank": -1}, 422, "query.rank: Input should be greater than or equal to 0", id="latest-rank-negative"),  # noqa: E501
    # a run that does not exist
    pytest.param(f"/api/v1/runs/{MISSING_RUN}", {}, 404, f"unknown run {MISSING_RUN}", id="run-unknown"),  # noqa: E501
    # a run id that is not a number
    pytest.param("/api/v1/runs/latest-one", {}, 422, "path.run_id: Input should be a valid integer", id="run-id-word"),  # noqa: E501
    # a run state that does not exist
    pytest.param("/api/v1/runs", {"state": "paused"}, 422, "query.state: Input should be 'running', 'finished', 'failed' or 'crashed'", id="runs-state-unknown"),  # noqa: E501
    # limit 0
    pytest.param("/api/v1/runs", {"limit": 0}, 422, "query.limit: Input should be greater than or equal to 1", id="runs-limit-0"),  # noqa: E501
    # limit over 1000
    pytest.param("/api/v1/runs", {"limit": 1001}, 422, "query.limit: Input should be less than or equal to 1000", id="runs-limit-1001"),  # noqa: E501
    # a negative offset
    pytest.param("/api/v1/runs", {"offset": -1}, 422, "query.offset: Input should be greater than or equal to 0", id="runs-offset-negative"),  # noqa: E501
]
# fmt: on


@pytest.mark.parametrize(("path", "params", "status", "fragment"), QUERY_CASES)
def test_bad_query_is_refused_clearly(
    server: Collector, path: str, params: dict[str, Any], status: int, fragment: str
) -> None:
    run = seed(server)
    before = snapshot(server.http, run)
    reply = server.http.get(path.format(run=run), params=params)
    assert_refused(reply, status, REASON_OF_STATUS[status], fragment)
    assert snapshot(server.http, run) == before


def test_finishing_an_unknown_run_is_404(server: Collector) -> None:
    run = seed(server)
    before = snapshot(server.http, run)
    reply = server.http.post(f"/api/v1/runs/{MISSING_RUN}/finish", json={"state": "failed"})
    assert_refused(reply, 404, "not_found", f"unknown run {MISSING_RUN}")
    assert snapshot(server.http, run) == before


# -- numbers beyond what the database columns hold ------------------------------------
BIG = 2**31
HUGE = 2**64

# fmt: off
EXTREME_CASES = [
    # a run id past int4, for each endpoint that takes one
    pytest.param("GET", f"/api/v1/runs/{BIG}", {}, None, id="run-int4"),
    pytest.param("GET", f"/api/v1/runs/{BIG}/series", {}, None, id="series-int4"),
    pytest.param("GET", f"/api/v1/runs/{BIG}/latest", {}, None, id="latest-int4"),
    pytest.param("GET", f"/api/v1/runs/{BIG}/metrics", {"key": "loss"}, None, id="metrics-int4"),
    pytest.param("POST", f"/api/v1/runs/{BIG}/finish", {}, None, id="finish-int4"),
    pytest.param("POST", INGEST, {}, mp(batch(run=BIG)), id="ingest-int4"),
    # a rank past int4 in a query
    pytest.param("GET", "/api/v1/runs/{run}/metrics", {"key": "loss", "rank": BIG}, None, id="metrics-rank-int4"),  # noqa: E501
    pytest.param("GET", "/api/v1/runs/{run}/latest", {"rank": HUGE}, None, id="latest-rank-int64"),
    # a run id past int64
    pytest.param("GET", f"/api/v1/runs/{HUGE}", {}, None, id="run-int64"),
    pytest.param("GET", f"/api/v1/runs/{HUGE}/series", {}, None, id="series-int64"),
    pytest.param("POST", INGEST, {}, mp(batch(run=HUGE - 1)), id="ingest-uint64"),
    # an offset past int64
    pytest.param("GET", "/api/v1/runs", {"offset": HUGE}, None, id="runs-offset-int64"),
    # range bounds far beyond any data
    pytest.param("GET", "/api/v1/runs/{run}/metrics", {"key": "loss", "start": -1e300, "end": 1e300}, None, id="metrics-wide-range"),  # noqa: E501
]
# fmt: on


@pytest.mark.parametrize(("method", "path", "params", "body"), EXTREME_CASES)
def test_numbers_beyond_the_columns_get_an_answer_not_a_500(
    server: Collector,
    method: str,
    path: str,
    params: dict[str, Any],
    body: Encoder | None,
) -> None:
    run = seed(server)
    before = snapshot(server.http, run)
    content = None if body is None else body(run)
    headers = {"Content-Type": wire.MSGPACK} if body is not None else {}
    kwargs: dict[str, Any] = {"params": params, "content": content, "headers": headers}
    if method == "POST" and body is None:
        kwargs["json"] = {}
        del kwargs["content"]
    reply = server.http.request(method, path.format(run=run), **kwargs)
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        assert_refused(reply, reply.status_code, REASON_OF_STATUS[reply.status_code], "")
    assert snapshot(server.http, run) == before


@pytest.mark.parametrize(
    ("axis", "xs", "max_points"),
    [
        # steps 0 and 2**62: (x - lo) * 2 passes int64
        pytest.param("step", [0, 1, 2**62], 2, id="step-2**62"),
        # the full step range the wire accepts
        pytest.param("step", [0, 1, wire.MAX_INT64], 1, id="step-max"),
        # wall times from the epoch to near the largest float
        pytest.param("time", [0.0, 1.0, time.time() + 3600], 2, id="time-max"),
    ],
)
def test_downsampling_works_over_the_extremes_the_wire_accepts(
    server: Collector,
    axis: str,
    xs: list[float],
    max_points: int,
) -> None:
    run = seed(server)
    if axis == "step":
        points = [[x, 2000.0 + i, "edge", float(i)] for i, x in enumerate(xs)]
    else:
        points = [[i, x, "edge", float(i)] for i, x in enumerate(xs)]
    reply = server.post(INGEST, mp(batch(points=points))(run), wire.MSGPACK)
    assert reply.json() == {"accepted": len(xs), "duplicate": False, "commands": []}
    reply = server.http.get(
        f"/api/v1/runs/{run}/metrics", params={"key": "edge", "x": axis, "max_points": max_points}
    )
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert got["downsampled"] and got["total"] == len(xs)
    assert 1 <= len(got["buckets"]) <= max_points
    assert sum(b["count"] for b in got["buckets"]) == len(xs)
