"""The shared engine on a toy task: exact resume, time budget, schedule, weight-decay groups, checkpoints."""

import dataclasses
import json
import math

import pytest
import torch
from helpers import assert_same_weights, raise_at
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from clipsnail.core.config import OptimConfig, TrainConfig
from clipsnail.core.rng import seeded
from clipsnail.core.runs import CHECKPOINT, save_weights
from clipsnail.train.checkpoints import load_state, save_state
from clipsnail.train.data_order import ResumableBatchSampler
from clipsnail.train.engine import fit
from clipsnail.train.optim import build_optimizer, lr_lambda
from clipsnail.train.task import Task


@dataclasses.dataclass
class ToyConfig:
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=3))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        epochs=3, batch_size=8, checkpoint_every=2, log_every=1))


class NoisyDataset(Dataset):
    """Regression data whose samples get random noise: exercises per-sample seeding."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        index, seed = item
        with seeded(seed):
            return self.x[index] + 0.1 * torch.randn(4), self.y[index]


class ToyTask(Task):
    def __init__(self, crash_at=None, **train):
        self.config = ToyConfig()
        self.config.train = dataclasses.replace(self.config.train, **train)
        self.train_dataset = NoisyDataset()
        self.crash_at = crash_at
        self.evaluations = 0

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 1))

    def param_groups(self, model):
        return [{"params": list(model.named_parameters())}]

    def collate(self, samples):
        return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}

    def loss(self, model, batch):
        return ((model(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean(), {}

    def evaluate(self, model):
        self.evaluations += 1
        return {"dummy": 1.0}

    def save(self, model, run_dir):
        save_weights(model, run_dir / "model.safetensors")


class Crash(Exception):
    pass


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("crash_at", [3, 5, 10])  # mid-epoch after a checkpoint, mid-epoch, at an epoch end
def test_resume_after_crash_gives_identical_weights(tmp_path, crash_at):
    full = fit(ToyTask(), tmp_path / "full", progress=False)
    assert full.completed and full.step == 15
    with pytest.raises(Crash):
        fit(ToyTask(), tmp_path / "resumed", progress=False, on_step=raise_at(crash_at, Crash))
    again = fit(ToyTask(), tmp_path / "resumed", progress=False)
    assert again.completed and again.step == 15
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")
    # metrics.jsonl reads as one uninterrupted run
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    full_steps = [json.loads(ln)["step"] for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert steps == full_steps


@pytest.mark.parametrize("crash_at", [4, 5, 11])  # after a checkpoint, at an epoch end (none there), mid-epoch
def test_checkpoints_every_n_steps_alone_resume_exactly(tmp_path, monkeypatch, crash_at):
    import clipsnail.train.engine as engine

    settings = {"checkpoint_every": 3, "checkpoint_each_epoch": False}
    saved = []
    save_state = engine.save_state
    monkeypatch.setattr(engine, "save_state", lambda path, state: (saved.append(state["step"]),
                                                                   save_state(path, state)))
    full = fit(ToyTask(**settings), tmp_path / "full", progress=False)
    assert full.completed and full.step == 15 and saved[:4] == [3, 6, 9, 12]  # not at steps 5 and 10
    with pytest.raises(Crash):
        fit(ToyTask(**settings), tmp_path / "resumed", progress=False, on_step=raise_at(crash_at, Crash))
    again = fit(ToyTask(**settings), tmp_path / "resumed", progress=False)
    assert again.completed and again.step == 15
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")


def test_rerun_of_finished_run_does_nothing(tmp_path):
    fit(ToyTask(), tmp_path, progress=False)
    before = weights(tmp_path)
    result = fit(ToyTask(), tmp_path, progress=False)
    assert result.completed and result.step == 15
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path).items())


def slow_steps(seconds, then=None):
    """An on_step callback: each step takes `seconds` longer (a step time the budget plan can measure); `then`
    called after."""
    import time

    def on_step(step):
        time.sleep(seconds)
        if then is not None:
            then(step)
    return on_step


def test_a_budget_run_spans_its_schedule_over_the_steps_that_fit_and_ends_decayed(tmp_path):
    task = ToyTask(time_budget="1.2s", epochs=400)  # 2,000 steps configured; some 60 fit at 20 ms a step
    result = fit(task, tmp_path, progress=False, on_step=slow_steps(0.02))
    assert result.completed and 10 < result.step < 2000
    stepped = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    lrs = [r["lr"] for r in stepped]
    assert stepped[-1]["step"] == result.step
    min_lr = task.config.optim.min_lr_ratio * task.config.optim.lr
    # Decayed at the end, not stopped near the top (at the plan's end exactly min_lr; a step or two short of it
    # where the last steps ran slower than estimated and the budget ran out first)
    assert min_lr <= lrs[-1] <= min_lr + 0.02 * task.config.optim.lr
    assert max(lrs) == pytest.approx(task.config.optim.lr, rel=0.05)  # after a warmup, the top rate was reached


def test_a_resumed_budget_run_keeps_its_plan(tmp_path):
    def crash_after_plan(step):
        if step == 12:
            raise Crash

    with pytest.raises(Crash):
        fit(ToyTask(time_budget="1.2s", epochs=400), tmp_path, progress=False,
            on_step=slow_steps(0.02, crash_after_plan))
    warmup, planned = load_state(tmp_path / CHECKPOINT)["budget_plan"]
    assert 12 < planned < 2000 and warmup <= planned // 10
    again = fit(ToyTask(time_budget="1h", epochs=400), tmp_path, progress=False)  # another budget: the same plan
    assert again.completed and again.step == planned


def test_time_budget_stops_with_checkpoint_and_continues(tmp_path):
    result = fit(ToyTask(time_budget="0.000001s", budget_schedule="pause"), tmp_path, progress=False)
    assert not result.completed and result.step == 1
    assert (tmp_path / CHECKPOINT).exists() and (tmp_path / "model.safetensors").exists()
    result = fit(ToyTask(), tmp_path, progress=False)
    assert result.completed and result.step == 15
    full = fit(ToyTask(), tmp_path / "full", progress=False)
    assert all(torch.equal(v, weights(tmp_path / "full")[k]) for k, v in weights(tmp_path).items())
    assert full.completed


def test_max_steps_and_eval_every(tmp_path):
    task = ToyTask(max_steps=7, eval_every=0)
    result = fit(task, tmp_path, progress=False)
    assert result.step == 7 and result.completed
    assert task.evaluations == 1  # only at the end
    assert (tmp_path / "curves.png").exists()


def test_checkpoint_every_zero_checkpoints_only_at_epoch_ends(tmp_path):
    result = fit(ToyTask(checkpoint_every=0), tmp_path, progress=False)
    assert result.completed and load_state(tmp_path / CHECKPOINT)["step"] == result.step


def test_sampler_order_is_a_function_of_seed_and_epoch_and_can_skip():
    full = list(ResumableBatchSampler(20, 4, seed=3, epoch=1))
    assert len(full) == 5 and full == list(ResumableBatchSampler(20, 4, seed=3, epoch=1))
    assert full[2:] == list(ResumableBatchSampler(20, 4, seed=3, epoch=1, skip_batches=2))
    assert full != list(ResumableBatchSampler(20, 4, seed=3, epoch=2))
    assert sorted(i for b in full for i, _ in b) == list(range(20))


def test_warmup_then_cosine():
    f = lr_lambda(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_no_weight_decay_on_gains_biases_and_temperature():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.norm = nn.LayerNorm(3)
            self.logit_scale = nn.Parameter(torch.tensor(1.0))

    task = ToyTask()
    model = M()
    task.param_groups = lambda m: [{"params": list(m.named_parameters())}]
    opt = build_optimizer(task.config.optim, task.param_groups(model), model)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.lin.weight)}


def test_checkpoint_round_trip_of_nested_state(tmp_path):
    state = {"a": torch.arange(3), "b": [1, 2.5, "x", None, (4, 5)], "c": {"d": torch.ones(2, 2), 7: True}}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert torch.equal(back["a"], state["a"]) and back["b"] == state["b"] and back["c"][7] is True
    assert torch.equal(back["c"]["d"], state["c"]["d"])
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_metrics_reach_tensorboard_as_they_are_logged(tmp_path):
    pytest.importorskip("tensorboard")  # the tensorboard extra, part of the test extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(ToyTask(epochs=2), tmp_path)
    logged = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in logged if "loss" in r]
    assert [e.step for e in events.Scalars("eval/dummy")] == [r["step"] for r in logged if "eval/dummy" in r]


class HolesDataset(NoisyDataset):
    """NoisyDataset with unreadable samples (None), counted in `skipped` where the real datasets count them: in the
    collate (the CLIP and classification datasets) or as the sample is read (the shard stream)."""

    HOLES = (0, 7, 13)

    def __init__(self, count_in):
        super().__init__()
        self.count_in, self.skipped = count_in, 0

    def __getitem__(self, item):
        if item[0] in self.HOLES:
            self.skipped += self.count_in == "getitem"
            return None
        return super().__getitem__(item)


class HolesTask(ToyTask):
    def __init__(self, count_in, **train):
        super().__init__(**train)
        self.train_dataset = HolesDataset(count_in)
        self.seen = []  # train_dataset.skipped at each epoch's end, which is where the tasks warn about it

    def collate(self, samples):
        kept = [s for s in samples if s is not None]
        if self.train_dataset.count_in == "collate":
            self.train_dataset.skipped += len(samples) - len(kept)
        return super().collate(kept) if kept else None

    def after_epoch(self, model, run_dir, epoch):
        self.seen.append(self.train_dataset.skipped)


@pytest.mark.parametrize("count_in", ["collate", "getitem"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_samples_are_counted_in_the_main_process_with_any_number_of_workers(tmp_path, num_workers,
                                                                                      count_in):
    """DataLoader workers count unreadable samples in their own copies of the dataset: the count must still reach
    the main process, where the task warns about it at each epoch's end and where fit returns it."""
    task = HolesTask(count_in, num_workers=num_workers)
    result = fit(task, tmp_path, progress=False)
    holes = len(HolesDataset.HOLES)  # every epoch draws all 40 samples (5 full batches of 8)
    assert task.seen == [holes, 2 * holes, 3 * holes]
    assert result.skipped == task.train_dataset.skipped == 3 * holes
