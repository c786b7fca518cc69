"""Data-parallel training and gradient accumulation give the gradients of one process on the whole batch.

The multi-process tests start 2 gloo processes on the CPU, as `torchrun --nproc-per-node 2` would on GPUs.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY_CLASSIFY, sets, tiny_clip, tiny_clip_args, torchrun
from safetensors.torch import load_file, save_file

from clipsnail.families.clip import ClipConfig, ClipLossConfig
from clipsnail.tasks.clip import ClipTask
from clipsnail.train.engine import backward, split_batch

BATCH = 8


def fixed_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 50, (BATCH, 8), generator=g)
    tokens[:, -1] = 2  # <eot>
    return {
        "images": torch.randn(BATCH, 3, 16, 16, generator=g),
        "tokens": tokens,
        # image 0 appears twice (in both processes' halves) and two captions are the same text: multi-positive
        "image_ids": torch.tensor([0, 1, 2, 3, 0, 5, 6, 7]),
        "caption_ids": torch.tensor([10, 11, 12, 13, 14, 15, 11, 17]),
    }


def clip_task(local_loss: bool = False) -> ClipTask:
    """A CLIP task without data: only its loss is used here."""
    task = ClipTask.__new__(ClipTask)
    task.config = ClipConfig(loss=ClipLossConfig(local_loss=local_loss))
    return task


def gradients(model, batch, accum_steps=1, task=None):
    model.zero_grad(set_to_none=True)
    loss, _ = backward(task or clip_task(), model, batch, accum_steps, torch.amp.GradScaler("cpu", enabled=False),
                       contextlib.nullcontext)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_gradients(expected, actual, atol=1e-5):
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=1e-4, msg=name)


def _rank_worker(rank, world, store, out, local_loss, accum_steps):
    """One of `world` processes: its slice of the batch through DDP, the CLIP loss gathered across ranks."""
    from torch.nn.parallel import DistributedDataParallel

    from clipsnail.core import distributed as dist

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_clip(context_length=8)
        share = BATCH // world
        batch = {k: v[rank * share:(rank + 1) * share] for k, v in fixed_batch().items()}
        loss, _ = backward(clip_task(local_loss), DistributedDataParallel(model), batch, accum_steps,
                           torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext)
        mean_loss = dist.all_reduce_mean(loss)
        if rank == 0:
            grads = {n: p.grad.contiguous() for n, p in model.named_parameters()}
            save_file({"loss": mean_loss.reshape(1), **grads}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("local_loss,accum_steps", [(False, 1), (True, 1), (True, 2)])
def test_two_processes_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path, local_loss, accum_steps):
    out = tmp_path / "rank0.safetensors"
    mp.start_processes(_rank_worker, args=(2, tmp_path / "store", str(out), local_loss, accum_steps), nprocs=2,
                       start_method="spawn")
    expected_loss, expected = gradients(tiny_clip(context_length=8), fixed_batch())
    got = load_file(str(out))
    torch.testing.assert_close(got.pop("loss")[0], expected_loss, atol=1e-5, rtol=0)
    assert_same_gradients(expected, got)


def test_accumulation_over_4_micro_batches_gives_the_full_batch_gradients():
    model = tiny_clip(context_length=8)
    loss_full, full = gradients(model, fixed_batch())
    loss_accum, accum = gradients(model, fixed_batch(), accum_steps=4)
    torch.testing.assert_close(loss_accum, loss_full, atol=1e-6, rtol=0)
    assert_same_gradients(full, accum)  # to 1e-5: only the order of float sums differs
    # The temperature gets its gradient once, not once per micro-batch (open_clip's accum_freq counts it 4 times).
    assert full["logit_scale"].abs() > 0


def test_accumulation_for_losses_that_are_means_over_samples():
    """Tasks whose loss does not couple the batch (classification, PixelSNAIL): the mean of micro-batch means."""
    from clipsnail.train.task import Task

    class MeanSquaredTask(Task):
        def loss(self, model, batch):
            return ((model(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean(), {}

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    batch = {"x": torch.randn(12, 4), "y": torch.randn(12)}
    loss_full, full = gradients(model, batch, task=MeanSquaredTask())
    loss_accum, accum = gradients(model, batch, accum_steps=3, task=MeanSquaredTask())
    torch.testing.assert_close(loss_accum, loss_full)
    assert_same_gradients(full, accum, atol=1e-6)


def test_split_batch_keeps_fields_together():
    parts = split_batch({"a": torch.arange(6), "b": [1, 2, 3, 4, 5, 6], "c": (torch.zeros(6, 2), torch.ones(6))}, 3)
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["b"] for p in parts] == [[1, 2], [3, 4], [5, 6]]
    assert parts[2]["c"][0].shape == (2, 2) and parts[2]["c"][1].shape == (2,)


def test_batch_must_split_evenly_over_accumulation_steps(shapes_dir, tmp_path, capsys):
    from clipsnail.cli import main

    assert main(tiny_clip_args(shapes_dir, tmp_path / "run", "--set", "train.accum_steps=3")) == 2
    assert "batch_size 16 must split evenly" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- torchrun end to end


@pytest.mark.slow
def test_torchrun_training_matches_one_process_and_resumes_with_another_process_count(shapes_dir, tmp_path):
    from clipsnail.cli import main

    steps = ["--set", "train.max_steps=6", "--set", "train.checkpoint_every=100"]
    single = tmp_path / "single"
    assert main(tiny_clip_args(shapes_dir, single, *steps)) == 0

    double = tmp_path / "double"
    done = torchrun(tiny_clip_args(shapes_dir, double, *steps))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"val_image_retrieval_recall@1"') == 1  # one process reports
    assert len((double / "metrics.jsonl").read_text().splitlines()) == 7  # 6 steps + 1 evaluation, written once
    expected, got = load_file(str(single / "model.safetensors")), load_file(str(double / "model.safetensors"))
    assert_same_gradients(expected, got, atol=1e-4)  # same weights: the global batch does not depend on N

    # Stopped by the time budget after the first step under 2 processes, finished by 1: same weights again.
    resumed = tmp_path / "resumed"
    stopped = torchrun(tiny_clip_args(shapes_dir, resumed, *steps, "--time-budget", "0s", "--set",
                                      "train.budget_schedule=pause"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (resumed / "best.json").exists() and (resumed / "checkpoint").is_dir()
    assert main(tiny_clip_args(shapes_dir, resumed, *steps)) == 0
    assert_same_gradients(expected, load_file(str(resumed / "model.safetensors")), atol=1e-4)


@pytest.mark.slow
def test_lit_with_siglip_under_torchrun_matches_one_process(shapes_dir, tmp_path):
    """A locked image tower encoded once (rank 0, shared), SigLIP's text exchange, DDP with a frozen tower and an
    accumulated batch: the weights of one process on the whole batch."""
    from clipsnail.cli import main

    settings = sets(["train.max_steps=4", "finetune.lock_image=true", "data.augment=false", "loss.kind=siglip",
                     "train.accum_steps=2"])
    single = tmp_path / "single"
    assert main(tiny_clip_args(shapes_dir, single, *settings)) == 0
    double = tmp_path / "double"
    done = torchrun(tiny_clip_args(shapes_dir, double, *settings))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((double / "feature_cache").glob("image-*.safetensors"))) == 1
    expected, got = load_file(str(single / "model.safetensors")), load_file(str(double / "model.safetensors"))
    assert_same_gradients(expected, got, atol=1e-4)


@pytest.mark.slow
def test_classification_trains_under_torchrun(colours_dir, tmp_path):
    """The engine serves every task: a LeMeViT classifier under 2 processes."""
    run = tmp_path / "run"
    done = torchrun(["classify", "train", "--data", str(colours_dir), "--arch", "lemevit_tiny_cifar", "--out",
                     str(run), "--no-progress", *sets(TINY_CLASSIFY + ["train.max_steps=3"])])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("training finished at step 3") == 1
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 3
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_nodes_as_the_readme_launches_them(shapes_dir, tmp_path):
    """`torchrun --nnodes 2 --node-rank N --master-addr --master-port`, two 'machines' on this one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    args = tiny_clip_args(shapes_dir, run, "--set", "train.max_steps=3")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "clipsnail", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert sum(err.count("training finished at step 3") for _, err in outputs) == 1  # node 0 reports
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("setting", ["train.accum_steps=4", "train.grad_checkpointing=true"])
def test_memory_savers_train_to_the_same_weights(shapes_dir, tmp_path, setting):
    from clipsnail.cli import main

    steps = ["--set", "train.max_steps=3", "--set", "train.eval_every=0"]
    assert main(tiny_clip_args(shapes_dir, tmp_path / "plain", *steps)) == 0
    assert main(tiny_clip_args(shapes_dir, tmp_path / "saver", *steps, "--set", setting)) == 0
    expected = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert_same_gradients(expected, load_file(str(tmp_path / "saver" / "model.safetensors")), atol=1e-5)


def test_grad_checkpointing_needs_a_model_that_supports_it(tmp_path, capsys):
    from clipsnail.cli import main
    from clipsnail.data.shapes import generate_attribute_folder

    data = tmp_path / "colours"
    generate_attribute_folder(data, "color", 4, size=16, seed=0)
    assert main(["pixelsnail", "train", "--data", str(data), "--config", "tiny", "--out", str(tmp_path / "run"),
                 "--no-progress", "--set", "grad_checkpointing=true", "--set", "max_steps=1"]) == 2
    assert "does not support grad_checkpointing" in capsys.readouterr().err
