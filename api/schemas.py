"""Request and response bodies of the REST API.

Floats that are NaN or infinite serialise as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``, as on the wire (``ser_json_inf_nan``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runwatch.collector.storage.anomalies import AnomalyRecord, evidence_json
from runwatch.collector.storage.runs import RunRecord


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class CreateRun(Body):
    project: str = Field(description="Project name; created on first use.")
    name: str | None = Field(
        None, description="Run name, unique in the project; generated if absent."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Hyper-parameters; merged on resume."
    )
    tags: list[str] = Field(default_factory=list)


class FinishRun(Body):
    state: Literal["finished", "failed", "crashed"] = "finished"


class RunOut(Body):
    id: int
    project: str
    name: str
    state: str
    tags: list[str]
    config: dict[str, Any]
    created_at: float
    updated_at: float
    heartbeat_at: float | None
    finished_at: float | None


class RunCreated(RunOut):
    resumed: bool = Field(description="True when a run of that name already existed.")


class IngestReply(Body):
    accepted: int = Field(description="Points stored from this batch (0 for a replay).")
    duplicate: bool = Field(description="True when this (run, rank, seq) was already stored.")


class SeriesOut(Body):
    key: str
    rank: int
    n_points: int
    first_step: int | None
    last_step: int | None
    last_wall_time: float | None
    last_value: float | None


class LatestValue(Body):
    step: int
    wall_time: float
    value: float


class LatestOut(Body):
    run_id: int
    rank: int
    values: dict[str, LatestValue]


class BucketOut(Body):
    step_min: int
    step_max: int
    time_min: float
    time_max: float
    count: int
    nan_count: int = Field(
        description="Points in the bucket whose value is NaN (not in min/max/mean)."
    )
    min: float
    max: float
    mean: float


class MetricRangeOut(Body):
    run_id: int
    key: str
    rank: int
    axis: Literal["step", "time"]
    total: int = Field(description="Points in the requested range.")
    downsampled: bool
    points: list[tuple[int, float, float]] = Field(
        description="[step, wall_time, value] when not downsampled."
    )
    buckets: list[BucketOut] = Field(description="One aggregate per bucket when downsampled.")


class AnomalyOut(Body):
    id: int = Field(description="Increases with every anomaly stored: the cursor for `after`.")
    run_id: int
    rank: int
    key: str = Field(description="The series that showed the finding.")
    kind: str = Field(description="What was found, e.g. `loss_spike`, `nonfinite_loss`.")
    severity: str = Field(description="`info`, `warning` or `critical`.")
    step: int
    wall_time: float = Field(
        description="Unix time of the observation (of the check, for a finding made of time "
        "passing, such as a hang)."
    )
    score: float = Field(description="The detector's own measure (a z-score, a ratio).")
    detector: str
    message: str
    evidence: dict[str, float | str] = Field(
        description="The numbers behind the message; NaN and infinities as strings."
    )
    created_at: float = Field(description="Unix time the collector stored it.")


def anomaly_out(record: AnomalyRecord) -> AnomalyOut:
    return AnomalyOut(
        id=record.id,
        run_id=record.run_id,
        rank=record.rank,
        key=record.key,
        kind=record.kind,
        severity=record.severity,
        step=record.step,
        wall_time=record.wall_time,
        score=record.score,
        detector=record.detector,
        message=record.message,
        # Encoded here: a float inside a union loses ser_json_inf_nan in list responses.
        evidence=evidence_json(record.evidence),
        created_at=record.created_at,
    )


def run_out(record: RunRecord) -> RunOut:
    return RunOut(
        id=record.id,
        project=record.project,
        name=record.name,
        state=record.state,
        tags=list(record.tags),
        config=record.config,
        created_at=record.created_at,
        updated_at=record.updated_at,
        heartbeat_at=record.heartbeat_at,
        finished_at=record.finished_at,
    )
