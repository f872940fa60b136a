"""Request and response bodies of the REST API.

Floats that are NaN or infinite serialise as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``, as on the wire (``ser_json_inf_nan``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runwatch.collector.storage.anomalies import AnomalyRecord, evidence_json
from runwatch.collector.storage.checkpoints import MAX_STEP, CheckpointRecord
from runwatch.collector.storage.commands import MAX_DETAIL_LENGTH, CommandRecord
from runwatch.collector.storage.runs import RunRecord
from runwatch.wire import MAX_ID, MAX_INT64


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


MAX_WORLD_SIZE = 10**6


class CreateRun(Body):
    project: str = Field(description="Project name; created on first use.")
    name: str | None = Field(
        None, description="Run name, unique in the project; generated if absent."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Hyper-parameters; merged on resume."
    )
    tags: list[str] = Field(default_factory=list)
    world_size: int | None = Field(
        None,
        ge=1,
        le=MAX_WORLD_SIZE,
        description="Processes the trainer runs as (torch.distributed's world size). A "
        "single-process run takes commands at its next step, without the lead that keeps "
        "ranks in step.",
    )


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
    world_size: int | None = Field(description="Processes of the trainer, as its agent said.")


class RunCreated(RunOut):
    resumed: bool = Field(description="True when a run of that name already existed.")


class WireCommand(Body):
    """A command as the agent receives it: the fields of ``runwatch.wire.Command``."""

    id: int
    type: str
    args: dict[str, Any]
    at_step: int | None = Field(
        description="The step at whose boundary every rank applies it (null: the next one)."
    )
    source: str = Field(
        description="Who issued it: `api:<key prefix>`, `api:open` or `policy:<name>`."
    )


class IngestReply(Body):
    accepted: int = Field(description="Points stored from this batch (0 for a replay).")
    duplicate: bool = Field(description="True when this (run, rank, seq) was already stored.")
    commands: list[WireCommand] = Field(
        default_factory=list,
        description="Commands of the run this rank has not acknowledged (and that are neither "
        "expired nor cancelled), oldest first; repeated in every reply until acknowledged.",
    )


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
        world_size=record.world_size,
    )


# -- commands ---------------------------------------------------------------------------
MAX_SCALE_STEPS = 10**7
MAX_SKIP_BATCHES = 10**7
MAX_REASON_LENGTH = 500
MAX_EXPIRES_IN = 7 * 86_400.0
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class LrScaleArgs(Body):
    factor: FiniteFloat = Field(gt=0, le=100, description="Multiplies the learning rate.")
    steps: int = Field(
        ge=1, le=MAX_SCALE_STEPS, description="For this many steps; then the schedule resumes."
    )


class ClipArgs(Body):
    """Either a fixed ``max_norm`` or ``mode: "adaptive"`` (ZClip: EMA z-score clipping)."""

    max_norm: FiniteFloat | None = Field(None, gt=0, description="Fixed gradient-norm clip.")
    mode: Literal["adaptive"] | None = None
    z: FiniteFloat | None = Field(None, gt=0, description="Adaptive: z-score threshold (2.5).")
    alpha: FiniteFloat | None = Field(None, gt=0, lt=1, description="Adaptive: EMA factor (0.97).")

    @model_validator(mode="after")
    def _one_mode(self) -> ClipArgs:
        if (self.max_norm is None) == (self.mode is None):
            raise ValueError(
                "clip takes either max_norm (a fixed clip) or mode 'adaptive' (z, alpha), "
                "exactly one of them"
            )
        if self.mode is None:
            if self.z is not None or self.alpha is not None:
                raise ValueError("z and alpha apply only to mode 'adaptive'")
        else:
            self.z = 2.5 if self.z is None else self.z
            self.alpha = 0.97 if self.alpha is None else self.alpha
        return self


class SkipStepArgs(Body):
    pass


class ReasonArgs(Body):
    reason: str = Field("", max_length=MAX_REASON_LENGTH)


class RollbackArgs(Body):
    checkpoint: Literal["last_good"] | int = Field(
        "last_good", description="`last_good`, or the id of a registered checkpoint."
    )
    skip_batches: int = Field(
        0, ge=0, le=MAX_SKIP_BATCHES, description="Batches to skip after restoring."
    )
    lr_factor: FiniteFloat = Field(
        1.0, gt=0, le=1, description="Then scale the learning rate by this (1: leave it)."
    )
    lr_steps: int = Field(
        200, ge=1, le=MAX_SCALE_STEPS, description="For this many steps after restoring."
    )

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _last_good_or_id(cls, value: object) -> object:
        if value == "last_good" or (type(value) is int and 1 <= value <= MAX_ID):
            return value
        raise ValueError(
            f"checkpoint must be 'last_good' or a checkpoint id (an integer from 1 to {MAX_ID})"
        )


class _Issue(Body):
    at_step: int | None = Field(
        None,
        ge=0,
        le=MAX_INT64,
        description="Step at whose boundary every rank applies it; by default the run's latest "
        "step plus ~5 s of steps at its pace.",
    )
    expires_in: FiniteFloat | None = Field(
        None,
        ge=1,
        le=MAX_EXPIRES_IN,
        description="Seconds it stays deliverable (default: the server's command_ttl_seconds).",
    )


class IssueLrScale(_Issue):
    type: Literal["lr_scale"]
    args: LrScaleArgs


class IssueClip(_Issue):
    type: Literal["clip"]
    args: ClipArgs


class IssueSkipStep(_Issue):
    type: Literal["skip_step"]
    args: SkipStepArgs = Field(default_factory=SkipStepArgs)


class IssueCheckpoint(_Issue):
    type: Literal["checkpoint"]
    args: ReasonArgs = Field(default_factory=ReasonArgs)


class IssueRollback(_Issue):
    type: Literal["rollback"]
    args: RollbackArgs = Field(default_factory=RollbackArgs)


class IssueStop(_Issue):
    type: Literal["stop"]
    args: ReasonArgs = Field(default_factory=ReasonArgs)


IssueCommand = Annotated[
    IssueLrScale | IssueClip | IssueSkipStep | IssueCheckpoint | IssueRollback | IssueStop,
    Field(discriminator="type"),
]
"""``POST /api/v1/runs/{id}/commands``: one model per type of ``runwatch.wire.COMMAND_TYPES``."""


class AckOut(Body):
    rank: int
    status: str = Field(description="`applied`, `failed` or `expired`.")
    detail: str
    step: int | None = Field(description="The step at which the rank applied it.")
    acked_at: float


class CommandOut(Body):
    """A command with everything the audit log knows about it."""

    id: int
    run_id: int
    type: str
    args: dict[str, Any]
    at_step: int | None
    source: str
    state: str = Field(
        description="`pending`, `delivered`, `applied`, `failed` (rank 0's outcome), "
        "`expired` or `cancelled`."
    )
    created_at: float
    delivered_at: float | None = Field(description="First delivery to any rank.")
    finished_at: float | None
    expires_at: float
    cancelled_by: str | None
    acks: list[AckOut] = Field(description="Every rank's outcome, by rank.")


class PendingOut(Body):
    commands: list[WireCommand]


class AckCommand(Body):
    run: int = Field(ge=1, le=MAX_ID, description="The command's run.")
    rank: int = Field(ge=0, le=MAX_ID)
    status: Literal["applied", "failed", "expired"]
    detail: str = Field("", max_length=MAX_DETAIL_LENGTH)
    step: int | None = Field(None, ge=0, le=MAX_INT64)


class AckReply(Body):
    id: int
    state: str


def wire_command(record: CommandRecord) -> WireCommand:
    return WireCommand(
        id=record.id,
        type=record.type,
        args=record.args,
        at_step=record.at_step,
        source=record.source,
    )


def command_out(record: CommandRecord) -> CommandOut:
    return CommandOut(
        id=record.id,
        run_id=record.run_id,
        type=record.type,
        args=record.args,
        at_step=record.at_step,
        source=record.source,
        state=record.state,
        created_at=record.created_at,
        delivered_at=record.delivered_at,
        finished_at=record.finished_at,
        expires_at=record.expires_at,
        cancelled_by=record.cancelled_by,
        acks=[AckOut.model_validate(a, from_attributes=True) for a in record.acks],
    )


# -- checkpoints ------------------------------------------------------------------------
MAX_PATH_LENGTH = 4096


def _no_nul(value: str) -> str:
    """PostgreSQL text cannot hold NUL (pydantic already refuses lone surrogates)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class RegisterCheckpoint(Body):
    """``POST /api/v1/runs/{id}/checkpoints``: a checkpoint the agent has saved."""

    step: int = Field(ge=0, le=MAX_STEP, description="The step counter saved in it.")
    path: str = Field(min_length=1, max_length=MAX_PATH_LENGTH, description="Where it lies.")
    size_bytes: int = Field(ge=0, le=MAX_INT64)
    wall_time: FiniteFloat = Field(ge=0, description="Unix time the save finished.")
    reason: str = Field("", max_length=MAX_REASON_LENGTH)
    command: int | None = Field(
        None, ge=1, le=MAX_ID, description="The checkpoint or stop command that caused it."
    )
    keep: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        description="Retention: keep this many newest good checkpoints (null: keep all).",
    )

    check_text = field_validator("path", "reason")(_no_nul)


class CheckpointOut(Body):
    id: int = Field(description="Increases with every registration: the newest is the highest.")
    run_id: int
    step: int
    path: str
    size_bytes: int
    wall_time: float = Field(description="Unix time the save finished (the trainer's clock).")
    reason: str
    command: int | None = Field(description="The command that caused it.")
    label: Literal["good", "suspect", "unverified"] = Field(
        description="From the anomalies around its step and the run's progress, when read."
    )
    label_detail: str = Field(description="Why it has that label.")
    created_at: float = Field(description="Unix time the collector registered it.")
    deleted_at: float | None = Field(description="When retention (or an overwrite) dropped it.")


class CheckpointRegistered(Body):
    checkpoint: CheckpointOut
    prune: list[CheckpointOut] = Field(
        description="Checkpoints retention dropped now (marked deleted): the agent removes "
        "their files if it wrote them. A retried registration answers the same list."
    )


class CheckpointList(Body):
    checkpoints: list[CheckpointOut] = Field(description="Newest (highest id) first.")


def checkpoint_out(record: CheckpointRecord) -> CheckpointOut:
    return CheckpointOut.model_validate(record, from_attributes=True)
