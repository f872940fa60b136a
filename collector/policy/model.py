"""The policy file: YAML parsed into pydantic models, with errors that say where and what.

A policy maps anomalies to actions. Its shape (``collector/policies/default.yaml`` is the
commented example)::

    version: 1
    limits:
      rollbacks: {max: 3, within_steps: 5000, on_limit: [ACTION, ...]}
    rules:
      - name: rollback-on-divergence        # source of its commands: policy:<name>
        kinds: [divergence, nonfinite_*]    # anomaly kinds, fnmatch globs (or one string)
        severities: [critical]              # default: any
        keys: ["train/*"]                   # series key globs, default: any
        projects: ["llm-*"]                 # project name globs, default: any
        cooldown_steps: 0                   # quiet for this many steps after its command
        actions: [ACTION, ...]
        otherwise: [ACTION, ...]            # when an action is refused (409)
    alerting: {...}                         # routes, escalations, channels: see
                                            # runwatch.alerting.config

An ACTION is a mapping with one key, a command type of :data:`runwatch.wire.COMMAND_TYPES`
or ``alert``, whose value holds the command's arguments, validated by the same models as
``POST /api/v1/runs/{id}/commands`` (``- skip_step`` alone is an action without arguments).

Every problem found is reported, each with its location (``rules[2].actions[0].lr_scale.factor:
Input should be greater than 0``), through :class:`PolicyError`; nothing is half-loaded.
"""

from __future__ import annotations

import fnmatch
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runwatch.alerting.config import AlertingConfig
from runwatch.api.schemas import (
    MAX_REASON_LENGTH,
    ClipArgs,
    LrScaleArgs,
    ReasonArgs,
    RollbackArgs,
    SkipStepArgs,
)
from runwatch.detectors.base import SEVERITIES
from runwatch.wire import COMMAND_TYPES

KNOWN_KINDS = (
    "nonfinite_loss",
    "loss_spike",
    "loss_spike_sustained",
    "divergence",
    "nonfinite_grad_norm",
    "grad_norm_spike",
    "grad_norm_spike_sustained",
    "nonfinite_activations",
    "activation_drift",
    "dead_units",
    "saturation",
    "update_ratio_high",
    "lr_loss_jump",
    "generalization_gap",
    "throughput_drop",
    "gpu_util_collapse",
    "step_time_regression",
    "data_stall",
    "memory_growth",
    "hardware_errors",
    "system_outlier",
    "straggler",
    "hang",
    "agent_silent",
)
"""Anomaly kinds the collector's detectors report (``detectors/defaults.py``)."""
ACTION_TYPES = (*COMMAND_TYPES, "alert")
LIMIT_RULE = "rollback_limit"
"""Rule name of the rollback limit's ``on_limit`` actions (source ``policy:rollback_limit``)."""
DEFAULT_POLICY = "default"
NO_POLICY = "off"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyRollbackArgs(RollbackArgs):
    """A policy rolls back to the last good checkpoint only: an id means nothing across runs."""

    @field_validator("checkpoint")
    @classmethod
    def _last_good(cls, value: object) -> object:
        if value != "last_good":
            raise ValueError("a policy rolls back to 'last_good' only")
        return value


class AlertArgs(_Strict):
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str = Field("", max_length=MAX_REASON_LENGTH)


class Action(_Strict):
    """One action: a mapping with exactly one of these keys, whose value holds its arguments."""

    lr_scale: LrScaleArgs | None = None
    clip: ClipArgs | None = None
    skip_step: SkipStepArgs | None = None
    checkpoint: ReasonArgs | None = None
    rollback: PolicyRollbackArgs | None = None
    stop: ReasonArgs | None = None
    alert: AlertArgs | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {value: None}
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(
                "an action is a mapping with one key, e.g. {lr_scale: {factor: 0.5, steps: 200}}, "
                "or the name of an action without arguments (skip_step)"
            )
        ((name, args),) = value.items()
        if name not in ACTION_TYPES:
            raise ValueError(f"unknown action {name!r} (known: {', '.join(ACTION_TYPES)})")
        return {name: {} if args is None else args}

    @property
    def type(self) -> str:
        """The command type, or ``alert``."""
        return next(name for name in ACTION_TYPES if getattr(self, name) is not None)

    @property
    def args(self) -> dict[str, Any]:
        """The arguments as the command stores them (defaults filled in)."""
        found: BaseModel = getattr(self, self.type)
        return found.model_dump(exclude_none=True)


Globs = Annotated[list[str], Field(min_length=1)]


class Rule(_Strict):
    name: str
    kinds: Globs
    severities: list[Literal["info", "warning", "critical"]] = Field(
        default_factory=lambda: list(SEVERITIES), min_length=1
    )
    keys: Globs | None = None
    projects: Globs | None = None
    cooldown_steps: int = Field(0, ge=0, le=10**9)
    actions: Annotated[list[Action], Field(min_length=1)]
    otherwise: list[Action] = Field(default_factory=list)

    @field_validator("kinds", "severities", "keys", "projects", mode="before")
    @classmethod
    def _listed(cls, value: object) -> object:
        """One pattern may be written without a list."""
        return [value] if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _a_name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(
                "a rule name is 1 to 64 letters, digits, '_', '.' or '-', starting with a "
                "letter or digit"
            )
        if value == LIMIT_RULE:
            raise ValueError(f"{LIMIT_RULE!r} is reserved for the rollback limit")
        return value

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = [k for k in value if not fnmatch.filter(KNOWN_KINDS, k)]
        if unknown:
            raise ValueError(
                f"no anomaly kind matches {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(KNOWN_KINDS)})"
            )
        return value

    @field_validator("otherwise")
    @classmethod
    def _no_rollback(cls, value: list[Action]) -> list[Action]:
        _refuse_rollback(value, "otherwise")
        return value

    def matches(self, kind: str, severity: str, key: str, project: str | None) -> bool:
        """Whether an anomaly so described fires this rule; ``project`` None: any project."""
        return (
            any(fnmatch.fnmatchcase(kind, k) for k in self.kinds)
            and severity in self.severities
            and (self.keys is None or any(fnmatch.fnmatchcase(key, k) for k in self.keys))
            and (
                project is None
                or self.projects is None
                or any(fnmatch.fnmatchcase(project, p) for p in self.projects)
            )
        )


def _refuse_rollback(actions: list[Action], where: str) -> None:
    """A fallback that rolls back would slip past the rollback limit."""
    if any(a.type == "rollback" for a in actions):
        raise ValueError(f"{where} cannot roll back")


class RollbackLimit(_Strict):
    max: int = Field(3, ge=1, le=1000, description="Rollbacks allowed within `within_steps`.")
    within_steps: int = Field(5000, ge=1, le=10**12)
    on_limit: list[Action] = Field(
        default_factory=lambda: [
            Action.model_validate({"stop": {"reason": "rollback limit reached"}}),
            Action.model_validate(
                {"alert": {"severity": "critical", "message": "rollback limit reached"}}
            ),
        ],
        min_length=1,
    )

    @field_validator("on_limit")
    @classmethod
    def _no_rollback(cls, value: list[Action]) -> list[Action]:
        _refuse_rollback(value, "on_limit")
        return value


class Limits(_Strict):
    rollbacks: RollbackLimit = Field(default_factory=RollbackLimit)


class Policy(_Strict):
    version: Literal[1] = 1
    limits: Limits = Field(default_factory=Limits)
    rules: list[Rule] = Field(default_factory=list)
    alerting: AlertingConfig = Field(default_factory=AlertingConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; names must be unique")
            seen.add(rule.name)
        return self


class PolicyError(Exception):
    """A policy that cannot be used; ``problems`` holds one ``location: what`` per problem."""

    def __init__(self, origin: str, problems: list[str]) -> None:
        super().__init__(f"policy {origin}: {'; '.join(problems)}")
        self.origin = origin
        self.problems = problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a list or a mapping cannot be a key", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_policy(text: str, origin: str = "<string>") -> Policy:
    """The policy in ``text``; :class:`PolicyError` listing every problem."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise PolicyError(origin, [_yaml_problem(exc)]) from None
    if data is None:
        raise PolicyError(origin, ["the file is empty; a policy needs at least 'rules'"])
    if not isinstance(data, dict):
        raise PolicyError(origin, [f"a policy is a mapping, not a {type(data).__name__}"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(origin, [_problem(e) for e in exc.errors()]) from None


def load_policy(path: str | Path) -> Policy:
    """The policy in the file at ``path``; :class:`PolicyError` when unreadable or invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise PolicyError(str(path), [f"cannot read it: {why}"]) from None
    return parse_policy(text, str(path))


def default_policy_text() -> str:
    """The shipped default policy, comments included."""
    return (
        resources.files("runwatch.collector")
        .joinpath("policies/default.yaml")
        .read_text(encoding="utf-8")
    )


def policy_from_setting(value: str) -> Policy | None:
    """``RUNWATCH_POLICY``: ``default`` (the shipped one), ``off`` (None) or a file's path."""
    if value == NO_POLICY:
        return None
    if value == DEFAULT_POLICY:
        return parse_policy(default_policy_text(), "default")
    return load_policy(value)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"not valid YAML: {what}"
    return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {what}"


def _problem(error: Any) -> str:
    where = ""
    for part in error["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        else:
            where += f".{part}" if where else str(part)
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "required field missing"
    return f"{where or 'policy'}: {message}"
