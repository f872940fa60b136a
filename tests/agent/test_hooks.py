"""The Watcher on real tiny models: what each hook measures, at which step, when its hooks
exist, and that a failing part costs the training loop nothing.

Expected values are computed by hand next to the loop (``clip_grad_norm_``, ``Tensor.norm``,
boolean masks), never by the code under test. The sink converts tensors only when a test reads
them, as the sender thread does, so a value that aliases live state shows up as wrong.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from runwatch.agent import hooks
from runwatch.agent.activations import (
    ACTIVATION_STATS,
    MAX_AUTO_ACTIVATIONS,
    activation_stats,
    auto_activation_modules,
)
from runwatch.agent.buffer import CRITICAL, DETAIL, SYSTEM
from runwatch.agent.checkpoint import Checkpointer
from runwatch.agent.control import Control
from runwatch.agent.hooks import Watcher
from runwatch.agent.interventions import Interventions
from runwatch.agent.safety import Faults

VOCAB = 50


class CapturingSink:
    """Records every put; converts tensors to floats only when read, like the sender thread."""

    def __init__(self) -> None:
        self.puts: list[tuple[int, Sequence[str], Any, int]] = []

    def put_scalars(self, step: int, values: Mapping[str, Any], priority: int = CRITICAL) -> None:
        for value in values.values():
            assert not (isinstance(value, torch.Tensor) and value.requires_grad)
        self.puts.append((step, list(values), list(values.values()), priority))

    def put_vector(
        self, step: int, keys: Sequence[str], values: Any, priority: int = DETAIL
    ) -> None:
        assert isinstance(values, torch.Tensor) and values.dim() == 1
        assert values.numel() == len(keys) and not values.requires_grad
        self.puts.append((step, list(keys), values, priority))

    def points(self) -> list[tuple[int, str, float, int]]:
        """(step, key, value, priority) of every point, in put order."""
        out = []
        for step, keys, values, priority in self.puts:
            floats = values.tolist() if isinstance(values, torch.Tensor) else values
            for key, value in zip(keys, floats, strict=True):
                out.append((step, key, float(value), priority))
        return out

    def series(self, key: str) -> dict[int, float]:
        return {step: value for step, k, value, _ in self.points() if k == key}

    def seen(self, step: int | None = None) -> set[str]:
        """Keys put (at ``step``, or at any step)."""
        return {k for s, k, _, _ in self.points() if step is None or s == step}

    def priority(self, key: str) -> int:
        return next(p for _, k, _, p in self.points() if k == key)


class TinyTransformer(nn.Module):
    """Token ids in, logits out; blocks in a ModuleList, a top-level parameter, and a layer
    that never takes part in the forward (its parameters get no gradient)."""

    def __init__(self, d: int = 16, n_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
            for _ in range(n_layers)
        )
        self.scale = nn.Parameter(torch.ones(()))
        self.unused = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x * self.scale)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def mlp_batch(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 8)


def token_batch(n: int = 4, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length))


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if x.dtype == torch.long:
        return nn.functional.cross_entropy(out.flatten(0, 1), x.flatten())
    return out.square().mean()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, *batches: torch.Tensor) -> None:
    optimizer.zero_grad()
    for x in batches:
        loss_of(model, x).backward()
    optimizer.step()


def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def faults() -> Iterator[Faults]:
    """A fresh fault record that re-raises, so an internal error fails the test loudly."""
    faults = Faults()
    faults.reraise = True
    yield faults
    assert faults.counts() == {}


@pytest.mark.parametrize("make", [mlp, TinyTransformer])
def test_grad_norm_equals_clip_grad_norm(make: Callable[[], nn.Module], faults: Faults) -> None:
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, faults=faults)
    expected = []
    for _ in range(3):
        x = token_batch() if isinstance(model, TinyTransformer) else mlp_batch()
        optimizer.zero_grad()
        loss_of(model, x).backward()
        if isinstance(model, TinyTransformer):
            assert model.unused.weight.grad is None  # skipped, as clip_grad_norm_ skips it
        expected.append(nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
        optimizer.step()
    got = sink.series("train/grad_norm")
    assert list(got) == [0, 1, 2]
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.stack(expected))
    assert sink.priority("train/grad_norm") == CRITICAL


def test_lr_of_every_group_follows_the_scheduler(faults: Faults) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}],
        lr=0.1,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    sink = CapturingSink()
    watcher = Watcher(model, optimizer, sink, scheduler=scheduler, faults=faults)
    for _ in range(4):
        train_step(model, optimizer, mlp_batch())
        scheduler.step()
    assert watcher.scheduler is scheduler
    assert sink.series("train/lr") == pytest.approx({0: 0.1, 1: 0.1, 2: 0.05, 3: 0.05})
    assert sink.series("train/lr/0") == sink.series("train/lr")
    assert sink.series("train/lr/1") == pytest.approx({0: 0.01, 1: 0.01, 2: 0.005, 3: 0.005})
    assert sink.priority("train/lr") == CRITICAL


def test_tensor_lr_is_copied_before_the_scheduler_changes_it(faults: Faults) -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.1), foreach=False)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, faults=faults)
    for _ in range(3):
        train_step(model, optimizer, mlp_batch())
        scheduler.step()  # fills the lr tensor in place
    assert sink.series("train/lr") == pytest.approx({0: 0.1, 1: 0.05, 2: 0.025})
    assert "train/lr/0" not in sink.seen()  # one group: no per-group keys


def test_per_layer_norms_and_update_ratio(faults: Faults) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, layer_every=2, activations=None, faults=faults)
    layers = {"0": model[0], "2": model[2]}
    expected: dict[int, dict[str, float]] = {}
    for step in range(5):
        optimizer.zero_grad()
        loss_of(model, mlp_batch()).backward()
        before = {name: [p.detach().clone() for p in m.parameters()] for name, m in layers.items()}
        optimizer.step()
        for name, module in layers.items():
            params = list(module.parameters())
            grad = math.sqrt(sum(p.grad.norm().item() ** 2 for p in params))
            norm = math.sqrt(sum(b.norm().item() ** 2 for b in before[name]))
            delta = math.sqrt(
                sum(
                    (p.detach() - b).norm().item() ** 2
                    for p, b in zip(params, before[name], strict=True)
                )
            )
            expected.setdefault(step, {})[f"grad_norm/{name}"] = grad
            expected[step][f"param_norm/{name}"] = norm
            expected[step][f"update_ratio/{name}"] = delta / norm
    for key in ("grad_norm/0", "param_norm/2", "update_ratio/0", "update_ratio/2"):
        got = sink.series(key)
        assert list(got) == [0, 2, 4], key
        assert got == pytest.approx({s: expected[s][key] for s in got}, rel=1e-5), key
        assert sink.priority(key) == DETAIL
    # The layers' gradient norms combine to the global one.
    for step in (0, 2, 4):
        combined = math.hypot(sink.series("grad_norm/0")[step], sink.series("grad_norm/2")[step])
        assert combined == pytest.approx(sink.series("train/grad_norm")[step], rel=1e-5)


def test_layer_names_top_level_params_foreign_params_and_no_grad(faults: Faults) -> None:
    model = TinyTransformer()
    extra = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, layer_every=1, activations=None, faults=faults)
    optimizer.zero_grad()
    (loss_of(model, token_batch()) + extra.sum()).backward()
    optimizer.step()
    n = len(list(model.parameters()))
    keys = {k.removeprefix("grad_norm/") for k in sink.seen(0) if k.startswith("grad_norm/")}
    assert {"embed", "scale", "head", "unused", f"param{n}", "layers.0.self_attn"} <= keys
    assert {"layers.0.self_attn.out_proj", "layers.2.linear1", "layers.1.norm2"} <= keys
    assert sink.series("grad_norm/unused") == {0: 0.0}  # a layer without gradients
    assert sink.series("update_ratio/unused") == {0: 0.0}
    assert sink.series(f"param_norm/param{n}") == pytest.approx({0: math.sqrt(3)})
    layer_norms = [v for s, k, v, _ in sink.points() if k.startswith("grad_norm/")]
    global_norm = sink.series("train/grad_norm")[0]
    assert math.sqrt(sum(v * v for v in layer_norms)) == pytest.approx(global_norm, rel=1e-5)


def test_param_groups_added_later_are_picked_up(faults: Faults) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, layer_every=1, activations=None, faults=faults)
    train_step(model, optimizer, mlp_batch())
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.2})
    train_step(model, optimizer, mlp_batch())
    assert "grad_norm/2" not in sink.seen(0) and "grad_norm/2" in sink.seen(1)
    assert sink.series("train/lr/1") == pytest.approx({1: 0.2})


def test_activation_stats_by_hand() -> None:
    x = torch.randn(40, 25) * 3 + 1
    x[0, :7] = 0.0
    x[1, 0], x[2, 3], x[3, 4] = float("inf"), float("nan"), float("-inf")
    finite = x[torch.isfinite(x)]
    expected = torch.stack(
        (
            finite.mean(),
            finite.std(correction=0),
            finite.abs().max(),
            (x == 0).float().mean(),
            torch.tensor(3 / x.numel()),
        )
    )
    torch.testing.assert_close(activation_stats(x), expected)
    # Finite input: plain mean and std, even with a mean far above the spread.
    y = torch.randn(1000) * 0.01 + 100
    torch.testing.assert_close(activation_stats(y)[:2], torch.stack((y.mean(), y.std(0, False))))
    # Low precision input is reduced in float32.
    z = (torch.randn(1000) * 2 + 5).bfloat16()
    stats = activation_stats(z)
    assert stats.dtype == torch.float32
    torch.testing.assert_close(stats[:2], torch.stack((z.float().mean(), z.float().std(0, False))))
    # Nothing finite: the finite-value stats are 0, not NaN.
    nothing = torch.full((4,), float("nan"))
    assert activation_stats(nothing).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_activation_hooks_only_on_sampled_steps(faults: Faults) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CapturingSink()
    watcher = Watcher(model, optimizer, sink, activation_every=2, layer_every=0, faults=faults)
    assert watcher.activation_modules == ("0", "1", "2")
    assert forward_hooks(model) == 3  # step 0 is sampled: hooked from the start
    expected = {}
    for step in range(3):
        first, second = mlp_batch(), mlp_batch()
        with torch.no_grad():
            model(mlp_batch())  # an evaluation forward is not recorded
            hidden = model[0](first)
            expected[step] = {"0": hidden, "1": model[1](hidden), "2": model[2](model[1](hidden))}
        train_step(model, optimizer, first, second)  # two micro-batches: the first is recorded
        if step == 0:
            assert forward_hooks(model) == 0
    model(mlp_batch())  # step 3 begins: not sampled
    assert watcher.step == 3 and forward_hooks(model) == 0
    assert {k for k in sink.seen() if k.startswith("act/")} == {
        f"act/{m}/{s}" for m in ("0", "1", "2") for s in ACTIVATION_STATS
    }
    for step in (0, 2):
        for name, out in expected[step].items():
            got = [sink.series(f"act/{name}/{s}")[step] for s in ACTIVATION_STATS]
            want = [
                out.mean().item(),
                out.std(correction=0).item(),
                out.abs().max().item(),
                (out == 0).float().mean().item(),
                0.0,
            ]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (step, name)
    assert 0.2 < sink.series("act/1/zero_frac")[0] < 0.8  # ReLU zeroes about half
    assert 1 not in sink.series("act/0/mean")
    assert sink.priority("act/0/mean") == DETAIL


class Blowup(nn.Module):
    """Puts an Inf and a NaN into its output, as an overflowing layer would."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        y = x.clone()
        y[0, 0], y[1, 1] = float("inf"), float("nan")
        return y, 0


class Pick(nn.Module):
    """An integer output: no statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


def test_nonfinite_output_of_named_module(faults: Faults) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.blow = Blowup()
            self.pick = Pick()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.blow(self.fc(x))[0].nan_to_num(posinf=0.0, neginf=0.0)
            self.pick(y)
            return y.sum(1)

    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, activations=["blow", "pick"], faults=faults)
    x = mlp_batch(5)
    with torch.no_grad():
        out = model.blow(model.fc(x))[0]
    train_step(model, optimizer, x)
    assert sink.series("act/blow/nonfinite_frac") == pytest.approx({0: 2 / 20})
    finite = out[torch.isfinite(out)]
    assert sink.series("act/blow/mean")[0] == pytest.approx(finite.mean().item(), rel=1e-5)
    assert sink.series("act/blow/std")[0] == pytest.approx(finite.std(correction=0).item())
    assert not {"act/fc/mean", "act/pick/mean"} & sink.seen()


def test_auto_selection() -> None:
    assert auto_activation_modules(TinyTransformer()) == ["layers.0", "layers.1", "layers.2"]

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)

    assert auto_activation_modules(Plain()) == ["fc1", "fc2"]

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(100))
            self.mlp = nn.Sequential(*(nn.Linear(1, 1) for _ in range(120)))  # longer, smaller

    names = auto_activation_modules(Deep())
    assert len(names) == MAX_AUTO_ACTIVATIONS == len(set(names))
    assert names[0] == "blocks.0" and names[-1] == "blocks.99"
    gaps = {int(b.split(".")[1]) - int(a.split(".")[1]) for a, b in itertools.pairwise(names)}
    assert gaps <= {3, 4}


def test_activation_choices(faults: Faults) -> None:
    model, sink = mlp(), CapturingSink()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'nope'"):
        Watcher(model, optimizer, sink, activations=["0", "nope"], faults=faults)
    with pytest.raises(ValueError, match="'nope'"):
        Watcher(model, optimizer, sink, activations="nope", primary=False, faults=faults)
    for kwargs in ({"activations": None}, {"activation_every": 0}):
        watcher = Watcher(model, optimizer, sink, faults=faults, **kwargs)
        assert forward_hooks(model) == 0
        train_step(model, optimizer, mlp_batch())
        watcher.remove()
    assert not any(k.startswith("act/") for k in sink.seen())
    assert not optimizer._optimizer_step_pre_hooks and not model._forward_pre_hooks


def test_step_counter(faults: Faults) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CapturingSink()
    watcher = Watcher(model, optimizer, sink, start_step=5, faults=faults)
    assert watcher.step == 5
    train_step(model, optimizer, mlp_batch())
    assert watcher.step == 5  # a run.log() after optimizer.step() lands on the step just done
    with torch.no_grad():
        model(mlp_batch())  # evaluation of step 5's weights: still step 5
    assert watcher.step == 5
    loss = loss_of(model, mlp_batch())
    assert watcher.step == 6  # the next training forward begins step 6
    loss.backward()
    optimizer.step()
    optimizer.step()  # no forward in between: the pre-step hook moves on
    assert watcher.step == 7
    assert list(sink.series("train/grad_norm")) == [5, 6, 7]


def test_timing_and_throughput(faults: Faults) -> None:
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, faults=faults)
    for _ in range(3):
        time.sleep(0.003)  # the data loader
        train_step(model, optimizer, token_batch(4, 6), token_batch(4, 6))
    step_time = sink.series("train/step_time")
    assert list(step_time) == [0, 1, 2] and all(v > 0 for v in step_time.values())
    wait = sink.series("train/data_wait")
    assert list(wait) == [1, 2] and all(0.003 <= wait[s] < step_time[s] for s in wait)
    samples, tokens = sink.series("train/samples_per_s"), sink.series("train/tokens_per_s")
    for step in range(3):
        assert samples[step] * step_time[step] == pytest.approx(8)
        assert tokens[step] * step_time[step] == pytest.approx(8 * 6)
    assert sink.priority("train/step_time") == SYSTEM

    model, sink = mlp(), CapturingSink()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Watcher(model, optimizer, sink, faults=faults)
    for _ in range(2):
        train_step(model, optimizer, mlp_batch(6))
    assert sink.series("train/samples_per_s")[1] * sink.series("train/step_time")[1] == (
        pytest.approx(6)
    )
    assert "train/tokens_per_s" not in sink.seen()  # float input: no tokens


def test_secondary_rank_records_timing_only(faults: Faults) -> None:
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CapturingSink()
    Watcher(model, optimizer, sink, primary=False, layer_every=1, activation_every=1, faults=faults)
    assert forward_hooks(model) == 0
    for _ in range(3):
        train_step(model, optimizer, token_batch())
    assert sink.seen() == {
        "train/step_time",
        "train/data_wait",
        "train/samples_per_s",
        "train/tokens_per_s",
    }


def test_failing_activation_part_is_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(output: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(hooks, "activation_moments", broken)
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink, faults = CapturingSink(), Faults()
    Watcher(model, optimizer, sink, activation_every=1, faults=faults)
    for _ in range(3):
        train_step(model, optimizer, token_batch())
        assert forward_hooks(model) == 0
    assert faults.counts() == {"hooks.activations": 1}
    assert not any(k.startswith("act/") for k in sink.seen())
    assert list(sink.series("train/grad_norm")) == [0, 1, 2]  # the other parts keep going
    assert "grad_norm/layers.0.linear1" in sink.seen(0)


def test_failing_norms_switch_off_grad_and_layer_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(hooks, "_norms", broken)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink, faults = CapturingSink(), Faults()
    watcher = Watcher(model, optimizer, sink, layer_every=1, faults=faults)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        train_step(model, optimizer, mlp_batch())
    # The non-finite guard needs the norm too: it goes off with it (and refuses commands).
    assert faults.counts() == {"hooks.grad_norm": 1, "hooks.layers": 1, "hooks.control": 1}
    assert any((p - b).abs().sum() > 0 for p, b in zip(model.parameters(), before, strict=True))
    keys = sink.seen()
    assert "train/grad_norm" not in keys and not any(k.startswith("grad_norm/") for k in keys)
    assert {"train/lr", "train/step_time", "act/1/zero_frac"} <= keys
    assert watcher.step == 2


def test_remove_leaves_no_hooks(faults: Faults) -> None:
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CapturingSink()
    watcher = Watcher(model, optimizer, sink, faults=faults)
    assert forward_hooks(model) == 3 and model._forward_pre_hooks
    train_step(model, optimizer, token_batch())
    watcher.remove()
    watcher.remove()
    assert forward_hooks(model) == 0
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    n = len(sink.puts)
    for _ in range(10):
        train_step(model, optimizer, token_batch())
    assert len(sink.puts) == n


# -- checkpoints and the hooks -------------------------------------------------------------------

SAVE_SECONDS = 0.2


@pytest.mark.parametrize("closure", [False, True], ids=["plain", "closure"])
def test_checkpoint_time_is_left_out_of_the_step_timings(
    tmp_path: Path, faults: Faults, closure: bool
) -> None:
    saved: list[str] = []

    def slow_save(path: str, state: dict[str, Any]) -> None:
        time.sleep(SAVE_SECONDS)
        saved.append(path)

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, optimizer, directory=tmp_path, save=slow_save)
    sink = CapturingSink()
    watcher = Watcher(
        model,
        optimizer,
        sink,
        layer_every=0,
        activation_every=0,
        checkpointer=checkpointer,
        checkpoint_every=2,
        faults=faults,
    )
    for step in range(6):
        time.sleep(0.003)  # the data loader
        x = mlp_batch()
        optimizer.zero_grad()
        if closure:  # the forward runs inside step(), after the pre-step hook saved
            optimizer.step(lambda x=x: loss_of(model, x).backward())
        else:
            loss_of(model, x).backward()
            optimizer.step()
        if step == 2:
            watcher.checkpoint("between steps")
    assert len(saved) == 3  # steps 2 and 4, and the one between steps 2 and 3
    step_time, wait = sink.series("train/step_time"), sink.series("train/data_wait")
    assert list(step_time) == list(range(6)) and list(wait) == list(range(1, 6))
    assert all(0 < v < SAVE_SECONDS for v in step_time.values()), step_time
    assert all(0.003 <= v < SAVE_SECONDS for v in wait.values()), wait


def test_an_idle_step_with_routine_checkpoints_leaves_the_pre_step_work_alone(
    tmp_path: Path, faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[int] = []
    before_step = Interventions.before_step

    def spy(self: Interventions, step: int) -> None:
        called.append(step)
        before_step(self, step)

    monkeypatch.setattr(Interventions, "before_step", spy)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, optimizer, directory=tmp_path)
    watcher = Watcher(
        model,
        optimizer,
        CapturingSink(),
        checkpointer=checkpointer,
        checkpoint_every=4,
        faults=faults,
    )
    for _ in range(10):
        train_step(model, optimizer, mlp_batch())
    assert called == [4, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000004.pt",
        "step-000000008.pt",
    ]
    assert watcher.step == 9


@pytest.mark.parametrize("how", ["rollback", "resume"])
def test_a_load_after_a_step_that_raised_keeps_the_loaded_learning_rate(
    tmp_path: Path, faults: Faults, how: str
) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, optimizer, directory=tmp_path)
    control = Control(single_process=True)
    watcher = Watcher(
        model, optimizer, CapturingSink(), control=control, checkpointer=checkpointer, faults=faults
    )
    path = watcher.checkpoint("lr 0.1")
    assert path is not None
    optimizer.param_groups[0]["lr"] = 0.02  # a scheduler's decay
    control.receive([{"id": 1, "type": "lr_scale", "args": {"factor": 0.5, "steps": 3}}])

    def failing_closure() -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):  # after the pre-step hook, before the post-step one
        optimizer.step(failing_closure)
    assert optimizer.param_groups[0]["lr"] == 0.01
    if how == "rollback":
        watcher.rollback({"path": path, "lr_factor": 1.0, "lr_steps": 1}, watcher.next_step)
    else:
        assert watcher.resume(path) == 0
    assert optimizer.param_groups[0]["lr"] == 0.1  # the checkpoint's, not the stale 0.02
