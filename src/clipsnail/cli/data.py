"""`clipsnail data shapes|cifar10|cifar100|mnist|shards`: the built-in shapes dataset, the standard benchmarks
downloaded, and caption corpora as WebDataset tar shards."""

from __future__ import annotations

import argparse

from clipsnail.cli.common import add_caption_flags, print_json, say
from clipsnail.core.errors import ClipsnailError
from clipsnail.data.downloads import NAMES

# Each handler imports what it runs (PIL, torch) so that `clipsnail --help` starts at once.


def add_data(parser: argparse.ArgumentParser) -> None:
    data = parser.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("shapes", help="render the captioned shapes dataset")
    p.add_argument("--out", required=True, help="folder to write (new, or one this command wrote: see --overwrite)")
    p.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="the same seed renders the same scenes (default 0)")
    p.add_argument("--captions-per-image", type=int, default=3, help="captions written per scene (default 3)")
    p.add_argument("--holdout", default="", help="colour:shape combinations kept out of train/val, e.g. "
                                                 "purple:triangle,yellow:star")
    p.add_argument("--max-shapes", type=int, default=3, help="shapes per scene: 1 to this many")
    p.add_argument("--sizes", default="small,large", help="shape sizes to draw (e.g. 'large' for 16x16 images)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds a shapes dataset")
    p.set_defaults(func=cmd_data_shapes)

    for name in NAMES:
        p = data.add_parser(name, help=f"download {DESCRIPTIONS[name]}, MD5-checked, into a folder that --data "
                                       f"{'mnist' if 'mnist' in name else 'cifar'}:DIR reads; prints JSON")
        p.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier download: kept when "
                                                    "it holds this dataset)")
        p.add_argument("--from", dest="from_dir", metavar="FOLDER",
                       help="offline: take the dataset's files from this folder (fetched elsewhere) instead of the "
                            "network; the error of an offline download names them")
        p.set_defaults(func=cmd_data_download, dataset=name)

    p = data.add_parser("shards", help="write a caption corpus as WebDataset tar shards (open_clip/img2dataset "
                                       "format) for streaming training; prints JSON")
    add_caption_flags(p)
    p.add_argument("--out", required=True, help="folder for the shards, sizes.json and _info.json")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"], help="default: train")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle of the images across shards")
    p.add_argument("--no-shuffle", action="store_true", help="images in sorted name order instead of shuffled")
    p.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'train-' (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shards)


def cmd_data_shapes(args: argparse.Namespace) -> None:
    from clipsnail.data.shapes import generate_shapes

    holdout = parse_holdout(args.holdout)
    summary = generate_shapes(args.out, n=args.n, size=args.size, seed=args.seed,
                              captions_per_image=args.captions_per_image, holdout=holdout, max_shapes=args.max_shapes,
                              sizes=args.sizes.split(","), overwrite=args.overwrite)
    print_json(summary)
    say(f"wrote {args.out}/captions.csv, {args.out}/images/, {args.out}/split.json, {args.out}/scenes.json")


DESCRIPTIONS = {"cifar10": "CIFAR-10 (50,000 train + 10,000 test images, 32x32, 10 classes; 163 MB)",
                "cifar100": "CIFAR-100 (50,000 train + 10,000 test images, 32x32, 100 classes; 161 MB)",
                "mnist": "MNIST (60,000 train + 10,000 test digits, 28x28; 11 MB)"}


def cmd_data_download(args: argparse.Namespace) -> None:
    from clipsnail.data.downloads import download_dataset

    summary = download_dataset(args.dataset, args.out, from_dir=args.from_dir)
    print_json(summary)
    say(f"train on it with --data {summary['data']}, e.g. `clipsnail classify train --data {summary['data']} "
        f"--out runs/{args.dataset}`")


def cmd_data_shards(args: argparse.Namespace) -> None:
    from clipsnail.data.shards import write_shards

    summary = write_shards(args.captions, args.images, args.out, split=args.split, shard_size=args.shard_size,
                           format=args.format, split_file=args.split_file,
                           seed=None if args.no_shuffle else args.seed, strict=args.strict, prefix=args.prefix,
                           progress=not args.no_progress, follow_links=args.follow_links)
    print_json(summary)
    say(f"wrote {summary['shards']} shards; stream them with the pattern '{summary['pattern']}'")


def parse_holdout(text: str | None) -> list[tuple[str, str]]:
    from clipsnail.data.shapes import COLORS, SHAPES

    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        colour, sep, kind = item.strip().partition(":")
        if not sep or colour not in COLORS or kind not in SHAPES:
            raise ClipsnailError(f"--holdout {item!r}: expected COLOUR:SHAPE with colour in {', '.join(COLORS)} "
                                 f"and shape in {', '.join(SHAPES)}")
        pairs.append((colour, kind))
    return pairs
