#!/usr/bin/env python
"""Benchmark: PixelSNAIL sampling speed, the cached sampler (clipsnail.inference.sampling.cached_sample) against the
naive one (naive_sample: one full forward pass per pixel, what the official code does) and against one forward pass.

For every (preset, shape) in --presets x --shapes (default small, h12_noup_smallkey x 32x32x3, 28x28x1):
  model    PixelSNAIL(PixelSNAILConfig(channels=C, **CONFIGS[preset])), torch.manual_seed(0), random weights after
           data_dependent_init on a random batch of --batch images quantised to the 256 levels; eval mode, float32,
           torch.no_grad, torch threads --threads (default 2). One set of sampling noise (sampling_noise, seeded)
           shared by every sampler, so that they draw the same random numbers.
  forward  one forward pass over the finished batch (the cached sampler's images): the physical floor, since a
           sampler must compute every layer at every pixel at least once. One warm-up forward, then
           --forward-rounds timed forwards before the samplers and as many after them (machine drift); the median.
  cached   one complete cached_sample of the batch (H*W pixel steps), timed end to end, after a warm-up of a few
           pixel steps on a throw-away sampler state. images/s = batch / seconds.
  naive    a complete naive generation is H*W full forward passes (hours for h12), so the first --naive-steps (K,
           default 24) steps of the naive loop are timed one by one (the loop of naive_sample: full forward over
           the partly generated batch, then sampling of pixel i from the same noise) and the median step time is
           extrapolated to H*W steps (naive_extrapolated_from_steps = K). Every step has the same cost (one
           forward of the same shape), so the extrapolation is linear. --full-naive auto (default) also runs one
           complete naive_sample for the small preset at 28x28x1 when the extrapolation says it takes at most
           --full-naive-max-s (default 150 s), to validate the extrapolation (extrapolation_error).
  exactness  the tiny preset in float64 at 8x8 (RGB and grayscale, batch 3): cached_sample and naive_sample with
           the same noise must give identical images (torch.equal). In float32 (the timed runs) the two compute the
           same sums in a different order, so a rare pixel may differ; the share of equal values is recorded.
  memory   with --mem, each (preset, shape) in a fresh process: peak RSS (VmHWM) of a cached generation, and the
           peak during the generation minus the RSS before it (VmHWM reset through /proc/self/clear_refs).

Figures per row: seconds per batch and images/s for cached and naive, speedup = naive seconds / cached seconds,
cost_in_forward_passes = cached seconds / one forward's seconds. Goals (from the issue), recorded met / not met:
cached >= 10x naive at 32x32 (per preset), and cached total cost <= 3 forward passes over the finished batch.

    .venv/bin/python bench/pixelsnail_sampling.py            # full run: ~30-40 min idle, up to ~1.5 h shared
    .venv/bin/python bench/pixelsnail_sampling.py --mem      # plus peak memory (one more cached generation per row)
    .venv/bin/python bench/pixelsnail_sampling.py --presets small --shapes 28x28x1 --batch 2 --naive-steps 2 \\
        --forward-rounds 1 --full-naive never --out runs/pixelsnail_sampling_smoke.json     # smoke test, ~25 s

Expected duration (estimated from smoke runs on a 2-core CPU shared with another benchmark): the two h12 rows
dominate, 12-40 min each. One forward of h12_noup_smallkey (46M parameters) at batch 16 took 24 s at 28x28x1 and
29 s at 32x32x3 there, so the 5 timed forwards take 2-3 min and the K = 24 naive steps 6-12 min per row; one cached
pixel step took 0.1 s (1 thread) to 1.5 s (2 threads contending with the other job), i.e. 2-25 min per cached
generation of 784-1,024 pixels. The small rows take 1-3 min each, plus the complete naive generation at 28x28x1
when the extrapolation allows it (<= --full-naive-max-s). --mem repeats one cached generation per row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import _common

_common.use_source_tree()
say = _common.say

PRESETS = ("small", "h12_noup_smallkey")
SHAPES = ("32x32x3", "28x28x1")
SEED = 0
NOISE_SEED = 1
GOAL_SPEEDUP = 10.0  # cached >= 10x naive, at 32x32
GOAL_FORWARDS = 3.0  # cached total cost <= 3 forward passes over the finished batch
EXACT_SIZE = 8  # the exactness check: tiny preset, float64, 8x8


def _r(v, nd=4):
    return None if v is None else round(v, nd)


# ============================================================================================== model and noise


def build_model(preset: str, channels: int, init_batch, dtype=None):
    """The preset's PixelSNAIL, seeded, data-dependent-initialised on `init_batch`, in eval mode."""
    import torch

    from clipsnail.layers.causal import data_dependent_init
    from clipsnail.models.pixelsnail import CONFIGS, PixelSNAIL, PixelSNAILConfig

    torch.manual_seed(SEED)
    model = PixelSNAIL(PixelSNAILConfig(channels=channels, **CONFIGS[preset]))
    if dtype is not None:
        model = model.to(dtype)
    data_dependent_init(model, init_batch)
    return model.eval()


def random_images(batch: int, channels: int, height: int, width: int, seed: int = SEED, dtype=None):
    """Random images on the 256 levels k / 127.5 - 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, channels, height, width), generator=g).float() / 127.5 - 1.0
    return x if dtype is None else x.to(dtype)


def make_noise(model, batch: int, height: int, width: int, dtype=None):
    import torch

    from clipsnail.layers.mixture import sampling_noise

    cfg = model.cfg
    return sampling_noise(batch, height, width, cfg.nr_mix, cfg.channels, torch.Generator().manual_seed(NOISE_SEED),
                          dtype=dtype or next(model.parameters()).dtype)


def sampler_buffer_mib(model, batch: int, height: int, width: int) -> float:
    """Memory the cached sampler allocates up front (conv input buffers, attention key/value caches, the image)."""
    import torch

    from clipsnail.inference.sampling import CachedSampler

    state = CachedSampler(model, batch, height, width)
    seen: set[int] = set()
    total = 0

    def visit(obj) -> None:  # tensors held by the state: conv buffers (_Conv.buffer), key/value caches, the image
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict | list | tuple):
            for v in obj.values() if isinstance(obj, dict) else obj:
                visit(v)
        elif hasattr(obj, "conv1"):  # a gated block: its convs
            for v in (obj.conv1, obj.conv2, obj.aux):
                visit(v)
        elif getattr(obj, "buffer", None) is not None:  # a k x k conv
            visit(obj.buffer)

    visit([state.x, state.stem_down, state.stem_down_right, state.blocks])
    return round(total / 2**20, 2)


# ============================================================================================== samplers


def naive_steps(model, x, noise, steps: int, times: list[float]):
    """The first `steps` steps of naive_sample on `x` (modified in place), each step timed into `times`."""
    import torch

    from clipsnail.layers.mixture import sample_from_discretized_mix_logistic

    cfg = model.cfg
    width = x.shape[3]
    with torch.no_grad():
        for i in range(steps):
            r, c = divmod(i, width)
            t = time.perf_counter()
            params = model(x)[:, :, r : r + 1, c : c + 1]
            x[:, :, r : r + 1, c : c + 1] = sample_from_discretized_mix_logistic(
                params, cfg.nr_mix, cfg.channels, 1.0,
                {k: v[:, :, r : r + 1, c : c + 1] for k, v in noise.items()})
            times.append(time.perf_counter() - t)
    return x


def warm_up_cached(model, batch: int, height: int, width: int, pixels: int = 4) -> None:
    """A few pixel steps on a throw-away cached-sampler state (first-call costs, allocator warm-up)."""
    import torch

    from clipsnail.inference.sampling import CachedSampler

    with torch.no_grad():
        state = CachedSampler(model, batch, height, width)
        for i in range(min(pixels, height * width)):
            r, c = divmod(i, width)
            state.params_at(r, c)
            state.write(r, c, state.x.new_zeros(batch, model.cfg.channels))


def timed_forward(model, x) -> float:
    import torch

    with torch.no_grad():
        t = time.perf_counter()
        model(x)
        return time.perf_counter() - t


def equal_share(a, b) -> float:
    return round((a == b).float().mean().item(), 6)


# ============================================================================================== exactness (float64)


def exactness_check() -> dict:
    import torch

    from clipsnail.inference.sampling import cached_sample, naive_sample

    out = {"preset": "tiny", "dtype": "float64", "height": EXACT_SIZE, "width": EXACT_SIZE, "batch": 3}
    for channels in (3, 1):
        x = random_images(3, channels, EXACT_SIZE, EXACT_SIZE, dtype=torch.float64)
        model = build_model("tiny", channels, x, dtype=torch.float64)
        noise = make_noise(model, 3, EXACT_SIZE, EXACT_SIZE, torch.float64)
        t = time.perf_counter()
        naive = naive_sample(model, 3, EXACT_SIZE, EXACT_SIZE, noise=noise)
        t_naive = time.perf_counter() - t
        t = time.perf_counter()
        cached = cached_sample(model, 3, EXACT_SIZE, EXACT_SIZE, noise=noise)
        t_cached = time.perf_counter() - t
        levels = (cached + 1) * 127.5
        out[f"channels_{channels}"] = {
            "identical": bool(torch.equal(naive, cached)),
            "max_abs_diff": (naive - cached).abs().max().item(),
            "on_256_levels": bool(torch.allclose(levels, levels.round(), atol=1e-6)),
            "naive_seconds": _r(t_naive), "cached_seconds": _r(t_cached),
        }
    out["identical"] = all(out[f"channels_{c}"]["identical"] for c in (3, 1))
    return out


# ============================================================================================== peak memory (child)


def mem_child(args) -> None:
    """In a fresh process: build the model (initialised on 2 images, to keep the init's own peak small), reset the
    peak, run one cached generation of the batch, print the memory figures as JSON."""
    import torch

    from clipsnail.inference.sampling import cached_sample

    torch.set_num_threads(args.threads)
    preset, shape = args.mem_child
    height, width, channels = _common.parse_shape(shape)
    rss_imports = _common.proc_status_mib("VmRSS")
    model = build_model(preset, channels, random_images(2, channels, height, width))
    noise = make_noise(model, args.batch, height, width)
    rss_before = _common.proc_status_mib("VmRSS")
    peak_before = _common.proc_status_mib("VmHWM")
    reset = _common.reset_peak_rss()
    t = time.perf_counter()
    cached_sample(model, args.batch, height, width, noise=noise)
    seconds = time.perf_counter() - t
    peak = _common.proc_status_mib("VmHWM")
    if peak is None:
        peak_before = peak = _common.peak_rss_mib()
    _common.print_mem({
        "rss_after_imports_mib": rss_imports,
        "rss_after_create_mib": rss_before,
        "peak_rss_before_sampling_mib": peak_before,
        "peak_rss_mib": max(peak_before or 0.0, peak),
        "peak_during_sampling_minus_rss_before_mib": round(peak - rss_before, 1)
        if reset and rss_before is not None else None,
        "sampling_seconds": round(seconds, 2),
        "source": "VmHWM" if rss_before is not None else "getrusage",
    })


def measure_mem(preset: str, shape: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-child", preset, shape,
           "--batch", str(args.batch), "--threads", str(args.threads)]
    return _common.run_mem_child(cmd)


# ============================================================================================== one row


def run_row(preset: str, shape: str, args) -> dict:
    import torch

    from clipsnail.inference.sampling import cached_sample, naive_sample

    height, width, channels = _common.parse_shape(shape)
    pixels = height * width
    batch = args.batch
    t0 = time.perf_counter()
    model = build_model(preset, channels, random_images(batch, channels, height, width))
    init_seconds = time.perf_counter() - t0
    noise = make_noise(model, batch, height, width)
    row: dict = {"preset": preset, "shape": shape, "height": height, "width": width, "channels": channels,
                 "batch": batch, "params": sum(p.numel() for p in model.parameters()),
                 "init_seconds": _r(init_seconds, 2), "cached_sampler_buffers_mib":
                 sampler_buffer_mib(model, batch, height, width)}
    say(f"{preset} {shape}: {row['params'] / 1e6:.2f}M params, init {init_seconds:.1f} s")

    # forward floor, part 1 (warm-up + timed forwards before the samplers)
    finished = random_images(batch, channels, height, width, seed=SEED + 1)  # replaced by the cached images below
    forward_times = []
    timed_forward(model, finished)
    for _ in range(args.forward_rounds):
        forward_times.append(timed_forward(model, finished))
    say(f"  forward (before): {', '.join(f'{t:.3f}' for t in forward_times)} s")

    # naive: the first K steps, one by one
    k = min(args.naive_steps, pixels)
    step_times: list[float] = []
    partial = naive_steps(model, torch.zeros(batch, channels, height, width), noise, k, step_times)
    step_med, step_mean = _common.median(step_times), statistics.fmean(step_times)
    naive_seconds = step_med * pixels
    say(f"  naive: {k} steps, median {step_med:.3f} s/step -> {naive_seconds:.1f} s per batch (extrapolated)")

    # cached: one complete generation
    warm_up_cached(model, batch, height, width)
    t = time.perf_counter()
    cached = cached_sample(model, batch, height, width, noise=noise)
    cached_seconds = time.perf_counter() - t
    say(f"  cached: {cached_seconds:.1f} s per batch ({cached_seconds / pixels * 1000:.1f} ms per pixel step)")

    # forward floor, part 2: over the finished batch (the cached images), after the samplers
    after = [timed_forward(model, cached) for _ in range(args.forward_rounds)]
    say(f"  forward (after): {', '.join(f'{t:.3f}' for t in after)} s")
    forward_all = forward_times + after
    forward_seconds = _common.median(forward_all)

    # the naive steps drew the first K pixels with the same noise: compare with the cached images (float32)
    first = [divmod(i, width) for i in range(k)]
    naive_px = torch.stack([partial[:, :, r, c] for r, c in first])
    cached_px = torch.stack([cached[:, :, r, c] for r, c in first])

    naive = {
        "naive_extrapolated_from_steps": k,
        "extrapolated": k < pixels,
        "step_seconds_median": _r(step_med), "step_seconds_mean": _r(step_mean),
        "step_seconds_all": [_r(v) for v in step_times],
        "seconds_per_batch": _r(naive_seconds, 2),
        "images_per_s": _r(batch / naive_seconds, 6),
        "first_steps_equal_share_vs_cached": equal_share(naive_px, cached_px),
    }
    # one complete naive generation, to validate the extrapolation
    full_ok = (args.full_naive == "always" or (args.full_naive == "auto" and preset == "small"
                                                 and shape == "28x28x1" and naive_seconds <= args.full_naive_max_s))
    if full_ok:
        say(f"  naive: one complete generation ({pixels} forwards) ...")
        t = time.perf_counter()
        full = naive_sample(model, batch, height, width, noise=noise)
        full_seconds = time.perf_counter() - t
        naive["full_generation"] = {
            "seconds": _r(full_seconds, 2), "images_per_s": _r(batch / full_seconds, 6),
            "extrapolation_error": _r(naive_seconds / full_seconds - 1.0),
            "equal_share_vs_cached": equal_share(full, cached),
        }
        say(f"  naive full: {full_seconds:.1f} s (extrapolation {naive_seconds:.1f} s, "
            f"error {100 * (naive_seconds / full_seconds - 1):+.1f}%)")
    else:
        reason = ("--full-naive never" if args.full_naive == "never" else
                  f"extrapolated {naive_seconds:.0f} s > --full-naive-max-s {args.full_naive_max_s:g}"
                  if preset == "small" and shape == "28x28x1" else "auto: only the small preset at 28x28x1")
        naive["full_generation"] = {"skipped": reason}

    row.update({
        "forward": {"seconds_median": _r(forward_seconds), "seconds_all": [_r(v) for v in forward_all],
                    "images_per_s": _r(batch / forward_seconds, 3),
                    "over": "the cached sampler's finished images (after) and a random batch (before)"},
        "cached": {"seconds_per_batch": _r(cached_seconds, 2), "images_per_s": _r(batch / cached_seconds, 4),
                   "ms_per_pixel_step": _r(1000 * cached_seconds / pixels, 3)},
        "naive": naive,
        "speedup_cached_over_naive": _r(naive_seconds / cached_seconds, 2),
        "cost_in_forward_passes": _r(cached_seconds / forward_seconds, 2),
    })
    if args.mem:
        say("  peak memory of a cached generation (fresh process) ...")
        row["peak_mem"] = measure_mem(preset, shape, args)
        say(f"  {row['peak_mem']}")
    return row


# ============================================================================================== main


def goals_of(results: dict) -> dict:
    goals = {}
    for key, r in results.items():
        if r["height"] == 32 and r["width"] == 32:
            goals[f"cached>=10x_naive@{key}"] = {
                "preset": r["preset"], "shape": r["shape"], "target": GOAL_SPEEDUP,
                "speedup": r["speedup_cached_over_naive"],
                "naive_extrapolated": r["naive"]["extrapolated"],
                "met": r["speedup_cached_over_naive"] >= GOAL_SPEEDUP}
        goals[f"cached<=3_forwards@{key}"] = {
            "preset": r["preset"], "shape": r["shape"], "target": GOAL_FORWARDS,
            "cost_in_forward_passes": r["cost_in_forward_passes"],
            "met": r["cost_in_forward_passes"] <= GOAL_FORWARDS}
    return goals


def notes(args) -> list[str]:
    n = [
        "All timings: CPU, float32, eval mode, torch.no_grad, torch threads as in machine.torch_threads; random "
        "weights (torch.manual_seed(0)) after data_dependent_init on a random batch of images on the 256 levels. "
        "Sampling cost does not depend on the weights' values.",
        "cached.seconds_per_batch: one complete cached_sample of the batch (H*W pixel steps), wall clock, after a "
        "warm-up of 4 pixel steps on a throw-away state. images_per_s = batch / seconds.",
        "naive: the first naive_extrapolated_from_steps steps of naive_sample's loop (a full forward over the "
        "partly generated batch, then sampling that pixel) are timed one by one; seconds_per_batch = median step "
        "x H*W (every step is one forward of the same shape). naive.full_generation, where present, is one "
        "complete naive_sample and extrapolation_error = extrapolated / measured - 1.",
        "forward.seconds_median: median of --forward-rounds forwards before the samplers (random batch) and as "
        "many after them (over the cached sampler's finished images), after one warm-up forward. "
        "cost_in_forward_passes = cached seconds / that; speedup_cached_over_naive = naive seconds / cached "
        "seconds.",
        "exactness: the tiny preset in float64 at 8x8, batch 3, RGB and grayscale: naive_sample and cached_sample "
        "with the same noise; identical means torch.equal. In the float32 timed runs the two samplers sum in a "
        "different order, so a rare value may differ (first_steps_equal_share_vs_cached, "
        "full_generation.equal_share_vs_cached: share of equal values).",
        "cached_sampler_buffers_mib: what CachedSampler allocates up front (conv input buffers, attention "
        "key/value caches, the image). peak_mem (--mem): a fresh process per row (bench/pixelsnail_sampling.py "
        "--mem-child PRESET SHAPE), model initialised on 2 images, VmHWM reset just before one cached generation "
        "of the batch; peak_rss_mib is the process's peak RSS (VmHWM, /proc/self/status).",
        "Goals (from the issue): cached >= 10x naive at 32x32 for each preset; cached total cost <= 3 forward "
        "passes over the finished batch, for every row.",
        "The machine's cores may be shared with other work (machine.load_average_at_start/_at_end). The cached "
        "sampler runs thousands of small operations per pixel; with torch's OpenMP threads competing for busy "
        "cores these get several times slower (a pixel step of the small preset measured 3 ms with 1 thread and "
        "150 ms with 2 threads while another 2-thread job ran), so compare runs on an idle machine.",
    ]
    if args.batch != 16 or args.naive_steps < 8 or args.forward_rounds < 2:
        n.append("Not the standard configuration (batch 16, >= 8 naive steps, >= 2 forward rounds): a functional "
                 "check, the numbers are not comparable to the goals.")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated (default {','.join(PRESETS)})")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated HxWxC (default {','.join(SHAPES)})")
    p.add_argument("--batch", type=int, default=16, help="images generated at once (default 16)")
    p.add_argument("--naive-steps", type=int, default=24, help="naive steps timed and extrapolated (default 24)")
    p.add_argument("--forward-rounds", type=int, default=2,
                   help="timed forwards before the samplers and again after them (default 2, so 4 in all)")
    p.add_argument("--full-naive", choices=("auto", "always", "never"), default="auto",
                   help="one complete naive generation: auto = small preset at 28x28x1 only, if the extrapolation "
                        "says <= --full-naive-max-s (default auto)")
    p.add_argument("--full-naive-max-s", type=float, default=150.0)
    p.add_argument("--skip-exactness", action="store_true", help="skip the tiny float64 cached == naive check")
    p.add_argument("--mem", action="store_true", help="peak memory of the cached sampler, one process per row")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default="bench/results/pixelsnail_sampling.json")
    p.add_argument("--mem-child", nargs=2, metavar=("PRESET", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mem_child:
        mem_child(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    presets, shapes = _common.pixelsnail_rows(args.presets, args.shapes)
    out = _common.under_root(args.out)
    started, machine = _common.now_iso(), _common.machine_info()
    t_start = time.perf_counter()
    say(f"torch threads {torch.get_num_threads()}, batch {args.batch}, presets {presets}, shapes {shapes}")

    exact = None
    if not args.skip_exactness:
        exact = exactness_check()
        say(f"exactness (tiny, float64, {EXACT_SIZE}x{EXACT_SIZE}): cached == naive: {exact['identical']}")

    results = {}
    for preset in presets:
        for shape in shapes:
            results[f"{preset}/{shape}"] = run_row(preset, shape, args)
    goals = goals_of(results)
    load_at_end = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None

    report = _common.envelope(
        benchmark="pixelsnail_sampling",
        machine=dict(machine, load_average_at_end=load_at_end),
        date=started,
        config={"presets": presets, "shapes": shapes, "batch": args.batch, "threads": args.threads,
                "naive_steps": args.naive_steps, "forward_rounds": args.forward_rounds,
                "full_naive": args.full_naive, "full_naive_max_s": args.full_naive_max_s, "dtype": "float32",
                "seed": SEED, "noise_seed": NOISE_SEED, "temperature": 1.0, "peak_mem": args.mem},
        exactness=exact,
        results=results,
        goals=goals,
        total_seconds=round(time.perf_counter() - t_start, 1),
        notes=notes(args),
    )
    path = _common.write_json(out, report)
    say("")
    say(_common.format_table(
        ["preset", "shape", "params M", "fwd s", "cached s", "cached img/s", "naive s", "naive img/s", "naive from",
         "speedup", "cost fwds", "peak MiB"],
        [[r["preset"], r["shape"], round(r["params"] / 1e6, 2), r["forward"]["seconds_median"],
          r["cached"]["seconds_per_batch"], r["cached"]["images_per_s"], r["naive"]["seconds_per_batch"],
          r["naive"]["images_per_s"], f"{r['naive']['naive_extrapolated_from_steps']} steps",
          r["speedup_cached_over_naive"], r["cost_in_forward_passes"],
          (r.get("peak_mem") or {}).get("peak_rss_mib")] for r in results.values()]))
    if exact is not None:
        say(f"exactness: cached == naive (tiny, float64, {EXACT_SIZE}x{EXACT_SIZE}): {exact['identical']}")
    for key, g in goals.items():
        value = g.get("speedup", g.get("cost_in_forward_passes"))
        say(f"goal {key}: {value} (target {g['target']}) -> {'met' if g['met'] else 'not met'}")
    say(f"wrote {path} ({report['total_seconds']} s)")


if __name__ == "__main__":
    main()
