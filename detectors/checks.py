"""Conformance checks every series detector passes (river's ``river/checks`` in spirit).

A check takes a *factory*, a callable making a fresh detector (the class itself, or a
``functools.partial`` with options), and raises ``AssertionError`` when the detector breaks
the protocol of :mod:`runwatch.detectors.base`:

- it constructs with its defaults, stores its parameters verbatim under their own names
  (so ``type(d)(**params)`` is a clone), and its defaults are immutable;
- its class has a ``name``, a docstring with Parameters and a runnable example;
- ``update`` never raises, whatever the value (NaN, ±Inf, 0, negative, huge, tiny), returns
  ``None`` or a well-formed :class:`~runwatch.detectors.base.Anomaly`, and odd values do
  not leave it poisoned (a NaN in an EWMA silences a detector for good);
- it is deterministic, and ``_reset()`` makes it new again;
- ``snapshot()``/``restore()`` and pickling, at any point of a stream, give a detector that
  makes exactly the decisions the original makes on the rest of it;
- its snapshot stays under :data:`SNAPSHOT_BUDGET` bytes after 10,000 observations and
  does not keep growing (O(1) or bounded-window state).

Use :func:`conformance_cases` to parametrise a test over detectors and checks:

>>> from runwatch.detectors.nonfinite import NonFinite
>>> [case_id for case_id, _, _ in conformance_cases([NonFinite])][:2]
['NonFinite:check_constructs_with_defaults', 'NonFinite:check_docstring']
>>> for _, factory, check in conformance_cases({"nonfinite": NonFinite}):
...     check(factory)
"""

from __future__ import annotations

import inspect
import math
import pickle
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from runwatch.detectors.base import SEVERITIES, Anomaly, SeriesDetector

Factory = Callable[[], SeriesDetector]
Point = tuple[int, float, float]
"""``(step, value, wall_time)``."""

SNAPSHOT_BUDGET = 64 * 1024
"""Most bytes a detector's snapshot may take after 10,000 observations."""
GROWTH_ALLOWANCE = 1024
"""Most bytes a snapshot may grow between 10,000 and 20,000 observations (ADWIN's buckets
grow with the logarithm of its window)."""
ODD_VALUES = (
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    -1.0,
    -1e308,
    1e308,
    1e-308,
    5e-324,
    1.0,
    65504.0,
)
IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)


def mixed_stream(seed: int, n: int = 4000) -> list[Point]:
    """A stream in eight regimes that provokes most findings of most detectors.

    A noisy descending loss; the same five times higher; pinned at 1.0; the loss with
    spikes and zeros; a fraction jumping from 0.5 to 0.99; linear growth; a cumulative
    counter, still for a while; a tenth of the loss. Odd values (NaN, ±Inf, negatives) are
    sprinkled throughout; two observations share each step and wall time advances 5 s per
    observation, like the system sampler's.
    """
    rng = random.Random(seed)
    points: list[Point] = []
    part = max(n // 8, 1)
    for i in range(n):
        phase, j = divmod(i, part)
        base = (0.8 + 3.0 * math.exp(-i / 300)) * math.exp(rng.gauss(0.0, 0.05))
        match phase % 8:
            case 0:
                value = base
            case 1:
                value = 5.0 * base
            case 2:
                value = 1.0
            case 3:
                value = base * (20.0 if j % 50 == 0 else 1.0) if j % 37 else 0.0
            case 4:
                value = min(max((0.5 if j < part // 2 else 0.99) + rng.gauss(0.0, 0.005), 0), 1)
            case 5:
                value = base + 0.01 * j
            case 6:
                value = float(max(j - part // 2, 0) // 50)
            case _:
                value = 0.1 * base
        if i % 97 == 96:
            value = math.nan
        elif i % 211 == 210:
            value = rng.choice((math.inf, -math.inf, -value))
        points.append((i // 2, value, 5.0 * i))
    return points


def findings(detector: SeriesDetector, points: Iterable[Point]) -> list[str]:
    """The anomalies a detector returns on ``points``, as comparable strings (NaN-safe)."""
    return [repr(a) for step, v, t in points if (a := detector.update(step, v, t)) is not None]


def check_constructs_with_defaults(factory: Factory) -> None:
    detector = factory()
    assert isinstance(detector, SeriesDetector), f"{detector!r} is not a SeriesDetector"
    plain = type(detector)()
    assert isinstance(plain, SeriesDetector)


def check_docstring(factory: Factory) -> None:
    cls = type(factory())
    doc = inspect.getdoc(cls) or ""
    assert doc.strip(), f"{cls.__name__} has no docstring"
    assert ">>>" in doc, f"{cls.__name__}'s docstring has no example"
    if _parameters(cls):
        assert "Parameters" in doc, f"{cls.__name__}'s docstring has no Parameters section"
    module = inspect.getmodule(cls)
    assert module is not None and (module.__doc__ or "").strip(), f"{cls.__module__}: no doc"
    assert isinstance(getattr(cls, "name", None), str) and cls.name, f"{cls.__name__}: no name"


def check_params_stored_verbatim(factory: Factory) -> None:
    detector = factory()
    cls = type(detector)
    default = cls()
    params = _parameters(cls)
    for name, parameter in params.items():
        assert isinstance(parameter.default, IMMUTABLE), f"{name}: mutable default"
        assert hasattr(default, name), f"{cls.__name__}.{name} is not stored"
        assert _same(getattr(default, name), parameter.default), (
            f"{cls.__name__}.{name} = {getattr(default, name)!r}, not the default "
            f"{parameter.default!r}"
        )
    clone = cls(**{name: getattr(detector, name) for name in params})
    for name in params:
        assert _same(getattr(clone, name), getattr(detector, name)), f"{name} is not verbatim"


def check_update_survives_odd_values(factory: Factory) -> None:
    first = factory()
    for i, value in enumerate(ODD_VALUES):  # odd values before anything else was seen
        _returns_anomaly_or_none(first.update(i, value, float(i)))
    detector = factory()
    stream = mixed_stream(1, 600)
    for i, (step, value, t) in enumerate(stream):
        _returns_anomaly_or_none(detector.update(step, value, t))
        odd = ODD_VALUES[i % len(ODD_VALUES)]
        _returns_anomaly_or_none(detector.update(step, odd, t))
    for step in range(600, 700):  # a stretch of the same odd value, the same time, a step back
        _returns_anomaly_or_none(detector.update(step, ODD_VALUES[step % 3], 3000.0))
        _returns_anomaly_or_none(detector.update(step - 5, 1.0, 2990.0))


def check_odd_values_do_not_poison(factory: Factory) -> None:
    stream = mixed_stream(5)
    clean, detector = factory(), factory()
    findings(clean, stream)
    findings(detector, stream)
    step, _, t = stream[-1]
    for value in ODD_VALUES + (1.7e308, -1.7e308) * 3:  # differences overflow: NaN in an EWMA
        detector.update(step, value, t)
    findings(clean, stream)
    findings(detector, stream)
    for name, value in vars(clean).items():  # what the clean one learned finite stays finite
        if isinstance(value, float) and math.isfinite(value):
            learned = vars(detector)[name]
            assert math.isfinite(learned), f"{name} = {learned} after odd values ({value} without)"


def check_findings_are_well_formed(factory: Factory) -> None:
    for seed in range(3):
        detector = factory()
        detector.bind("checks/series", 3)
        for step, value, t in mixed_stream(seed):
            anomaly = detector.update(step, value, t)
            if anomaly is None:
                continue
            _returns_anomaly_or_none(anomaly)
            assert anomaly.detector == type(detector).name, anomaly
            assert anomaly.key == "checks/series" and anomaly.rank == 3, anomaly
            assert anomaly.step == step, anomaly
            assert anomaly.kind and anomaly.message, anomaly


def check_deterministic_and_reset(factory: Factory) -> None:
    stream = mixed_stream(2)
    first, second = factory(), factory()
    expected = findings(first, stream)
    assert findings(second, stream) == expected, "two fresh detectors decided differently"
    first._reset()  # type: ignore[attr-defined]
    assert findings(first, stream) == expected, "_reset() did not make the detector new"


def check_snapshot_restore(factory: Factory) -> None:
    stream = mixed_stream(3)
    for cut in (len(stream) // 4, len(stream) // 2, 3 * len(stream) // 4):
        original = factory()
        findings(original, stream[:cut])
        restored = factory()
        restored.restore(original.snapshot())
        rest = stream[cut:]
        assert findings(restored, rest) == findings(original, rest), f"differs after {cut}"


def check_pickle(factory: Factory) -> None:
    stream = mixed_stream(4)
    original = factory()
    original.bind("checks/series", 1)
    findings(original, stream[: len(stream) // 2])
    copy = pickle.loads(pickle.dumps(original))
    rest = stream[len(stream) // 2 :]
    assert findings(copy, rest) == findings(original, rest)


def check_snapshot_size_is_bounded(factory: Factory) -> None:
    detector = factory()
    for seed in range(5):
        findings(detector, mixed_stream(seed, 2000))
    size = len(detector.snapshot())
    assert size <= SNAPSHOT_BUDGET, f"{size} bytes after 10,000 observations"
    for seed in range(5, 10):
        findings(detector, mixed_stream(seed, 2000))
    grown = len(detector.snapshot()) - size
    assert grown <= GROWTH_ALLOWANCE, f"the snapshot grew by {grown} bytes in 10,000 more"


CHECKS: list[Callable[[Factory], None]] = [
    check_constructs_with_defaults,
    check_docstring,
    check_params_stored_verbatim,
    check_update_survives_odd_values,
    check_odd_values_do_not_poison,
    check_findings_are_well_formed,
    check_deterministic_and_reset,
    check_snapshot_restore,
    check_pickle,
    check_snapshot_size_is_bounded,
]


def conformance_cases(
    factories: Mapping[str, Factory] | Iterable[Factory],
) -> list[tuple[str, Factory, Callable[[Factory], None]]]:
    """``(id, factory, check)`` for every factory and check; ids ``f"{det}:{check}"``.

    ``det`` is the mapping's key, or the class name of what the factory makes (numbered
    when the same class comes twice).
    """
    if isinstance(factories, Mapping):
        named = list(factories.items())
    else:
        named, seen = [], {}
        for factory in factories:
            label = type(factory()).__name__
            seen[label] = seen.get(label, 0) + 1
            named.append((label if seen[label] == 1 else f"{label}#{seen[label]}", factory))
    return [
        (f"{det}:{check.__name__}", factory, check) for det, factory in named for check in CHECKS
    ]


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    signature = inspect.signature(cls.__init__)
    return {
        name: p
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _same(a: Any, b: Any) -> bool:
    return a is b or a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _returns_anomaly_or_none(result: object) -> None:
    if result is None:
        return
    assert isinstance(result, Anomaly), f"update returned {result!r}"
    assert result.severity in SEVERITIES, result
    assert math.isfinite(result.score), result
    assert isinstance(result.step, int), result
    for name, value in result.evidence.items():
        assert isinstance(value, float | int), f"evidence {name} = {value!r}"
