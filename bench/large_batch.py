"""Large CLIP batches on small hardware: what gradient accumulation and gradient checkpointing cost and save, and
what data parallelism over 2 CPU processes gives on this machine.

Part 1, memory and time of the forward + backward pass of one CLIP training step at OpenAI's ViT-B/32 size
(224 px, 12x768 image tower, 12x512 text tower, context 77), global batch 64, in a fresh process per setting:
plain; `train.accum_steps=4`; `train.grad_checkpointing=true`; both. Peak memory is the rise of the process's
peak RSS during the measured passes over its RSS before them (weights, gradients and AdamW state are already
allocated), i.e. what the activations of one step need. Every setting computes the same gradients
(tests/test_distributed.py).

Part 2, data parallelism on the CPU: the default shapes CLIP (32 px), global batch 128, one process with 2 threads
against `torchrun`-style 2 gloo processes with 1 thread each (the features all-gathered for the loss, the
gradients all-reduced by DDP), steps/s, interleaved rounds.

    python bench/large_batch.py            # ~10 minutes on 2 cores (--part 1 or 2 for one of them)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from _common import (
    RESULTS,
    envelope,
    format_table,
    git_commit,
    machine_info,
    median,
    now_iso,
    print_mem,
    proc_status_mib,
    reset_peak_rss,
    run_mem_child,
    say,
    use_source_tree,
    write_json,
)

use_source_tree()

VIT_B32 = {"vision": {"image_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12},
           "text": {"width": 512, "depth": 12, "heads": 8, "vocab_size": 49408, "context_length": 77, "eot_id": 49407},
           "head": {"embed_dim": 512}, "activation": "quick_gelu"}
SETTINGS = {"plain": (1, False), "accum_steps=4": (4, False), "grad_checkpointing": (1, True),
            "accum_steps=4 + grad_checkpointing": (4, True)}


def clip_task(local_loss: bool = False):
    """A CLIP task without data: only its loss is used."""

    from clipsnail.families.clip import ClipConfig, ClipLossConfig
    from clipsnail.tasks.clip import ClipTask

    task = ClipTask.__new__(ClipTask)
    task.config = ClipConfig(loss=ClipLossConfig(local_loss=local_loss))
    return task


def synthetic_batch(n: int, size: int, context: int, vocab: int, eot: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab - 2, (n, context), generator=g)
    lengths = torch.randint(8, 20, (n,), generator=g)  # captions are short: <eot> early, padding after
    tokens[torch.arange(n), lengths] = eot
    tokens[torch.arange(context)[None, :] > lengths[:, None]] = 0
    return {"images": torch.randn(n, 3, size, size, generator=g), "tokens": tokens,
            "image_ids": torch.arange(n), "caption_ids": torch.arange(n)}


def train_steps(model, batch, accum_steps: int, steps: int, optimizer_step: bool = True) -> list[float]:
    """Seconds per training step; without `optimizer_step` only forward + backward are timed (the gradients stay
    allocated between steps, so what a step adds to memory is its activations)."""
    import torch

    from clipsnail.train.engine import backward

    task = clip_task()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        backward(task, model, batch, accum_steps, scaler, contextlib.nullcontext)
        if optimizer_step:
            optimizer.step()
        times.append(time.perf_counter() - t)
    return times


def memory_child(setting: str, batch_size: int, steps: int) -> None:
    import torch

    from clipsnail.core.config import from_dict
    from clipsnail.models.clip import CLIP, ClipModelConfig

    torch.manual_seed(0)
    accum_steps, checkpointing = SETTINGS[setting]
    model = CLIP(from_dict(ClipModelConfig, VIT_B32)).train()
    if checkpointing:
        model.set_grad_checkpointing(True)
    batch = synthetic_batch(batch_size, 224, 77, 49408, 49407)
    warm = train_steps(model, batch, accum_steps, 1)  # allocates gradients and AdamW state
    before = proc_status_mib("VmRSS")
    reset_peak_rss()
    times = train_steps(model, batch, accum_steps, steps, optimizer_step=False)
    peak = proc_status_mib("VmHWM")
    print_mem({"setting": setting, "rss_before_mib": before, "peak_mib": peak,
               "step_peak_over_before_mib": round(peak - before, 1), "warmup_s": round(warm[0], 2),
               "step_s": [round(t, 2) for t in times]})


def _ddp_worker(rank: int, world: int, store: str, steps: int, batch_size: int, out: str) -> None:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from clipsnail.models.clip import CLIP, ClipModelConfig, ClipTextConfig

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(CLIP(ClipModelConfig(text=ClipTextConfig(vocab_size=2048))).train())
        share = batch_size // world
        full = synthetic_batch(batch_size, 32, 32, 2048, 2)
        batch = {k: v[rank * share:(rank + 1) * share] for k, v in full.items()}
        times = train_steps(model, batch, 1, steps + 1)[1:]
        if rank == 0:
            from clipsnail.core.safeio import atomic_write_text

            atomic_write_text(out, json.dumps(times))
    finally:
        torch.distributed.destroy_process_group()


def ddp_round(world: int, steps: int, batch_size: int) -> float:
    """Median seconds per step with `world` processes (1: plain, 2 threads)."""
    import torch
    import torch.multiprocessing as mp

    from clipsnail.models.clip import CLIP, ClipModelConfig, ClipTextConfig

    if world == 1:
        torch.set_num_threads(2)
        torch.manual_seed(0)
        model = CLIP(ClipModelConfig(text=ClipTextConfig(vocab_size=2048))).train()
        return median(train_steps(model, synthetic_batch(batch_size, 32, 32, 2048, 2), 1, steps + 1)[1:])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_ddp_worker, args=(world, os.path.join(tmp, "store"), steps, batch_size, out),
                           nprocs=world, start_method="spawn")
        with open(out) as f:
            return median(json.load(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per memory setting")
    parser.add_argument("--ddp-steps", type=int, default=20)
    parser.add_argument("--ddp-rounds", type=int, default=3)
    parser.add_argument("--part", choices=["1", "2", "both"], default="both",
                        help="run one part; the other's figures are kept from the existing results file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.child, args.batch_size, args.steps)
        return
    path = RESULTS / "large_batch.json"
    results = json.loads(path.read_text())["results"] if args.part != "both" and path.exists() else {}
    if args.part in ("1", "both"):
        results.update(memory_part(args))
    if args.part in ("2", "both"):
        results["ddp_cpu"] = ddp_part(args)
    write_json(path, envelope(
        benchmark="large_batch",
        machine=machine_info(),
        git_commit=git_commit(),
        date=now_iso(),
        config={"model": VIT_B32, "batch_size": args.batch_size, "steps": args.steps,
                "ddp": {"model": "ClipModelConfig() defaults (32 px)", "batch_size": 128,
                        "steps": args.ddp_steps, "rounds": args.ddp_rounds}},
        results=results,
        notes="Part 1 runs with MALLOC_MMAP_THRESHOLD_=65536 (its child processes only) so that freed tensors "
              "leave RSS; that makes every setting's passes slower, alike. Part 1 times forward + backward only. "
              "Step peak = rise of peak RSS during the measured passes over the RSS before them (weights, "
              "gradients and AdamW state already allocated): the activation memory of one step. All settings "
              "give the same gradients (tests/test_distributed.py).",
    ))
    say(f"wrote {path}")


def memory_part(args) -> dict:
    say(f"part 1: one CLIP ViT-B/32 training step, batch {args.batch_size}, a fresh process per setting")
    # glibc otherwise raises its mmap threshold as large blocks are freed, and the warm-up step's freed activations
    # stay resident on the heap: later peaks then hide under the RSS measured before them. A fixed threshold
    # maps every block over 64 KiB on its own and returns it when freed, so RSS follows the live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        memory = {}
        for setting in SETTINGS:
            memory[setting] = run_mem_child([sys.executable, __file__, "--child", setting,
                                             "--batch-size", str(args.batch_size), "--steps", str(args.steps)])
            say(f"  {setting}: {memory[setting]}")
    finally:  # not for part 2's processes
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    base = memory["plain"]
    rows = []
    for setting, m in memory.items():
        if "error" in m:
            rows.append([setting, None, None, None, None])
            continue
        step = median(m["step_s"])
        rows.append([setting, m["step_peak_over_before_mib"],
                     round(m["step_peak_over_before_mib"] / base["step_peak_over_before_mib"], 3),
                     round(step, 2), round(step / median(base["step_s"]), 2)])
    say(format_table(["setting", "step peak MiB", "x plain", "s/step", "x plain"], rows))
    return {"memory_and_time": memory, "table": rows}


def ddp_part(args) -> dict:
    say(f"part 2: shapes CLIP, global batch 128, 1 process x 2 threads vs 2 gloo processes x 1 thread, "
        f"{args.ddp_rounds} interleaved rounds of {args.ddp_steps} steps")
    single, double = [], []
    for r in range(args.ddp_rounds):
        single.append(ddp_round(1, args.ddp_steps, 128))
        double.append(ddp_round(2, args.ddp_steps, 128))
        say(f"  round {r + 1}: 1 process {single[-1]:.3f} s/step, 2 processes {double[-1]:.3f} s/step")
    ddp = {"single_process_s_per_step": [round(t, 4) for t in single],
           "two_processes_s_per_step": [round(t, 4) for t in double],
           "median_speedup_two_processes": round(median(single) / median(double), 3)}
    say(f"  median speed-up of 2 processes: {ddp['median_speedup_two_processes']}x")
    return ddp


if __name__ == "__main__":
    main()
