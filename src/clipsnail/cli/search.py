"""`clipsnail index build|update`, `search`, `zeroshot` and `serve`: using a CLIP run on images."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import shutil
from pathlib import Path

from clipsnail.cli.common import (
    add_batch_size_flag,
    add_follow_links_flag,
    add_runtime_flags,
    print_json,
    print_metrics,
    requires_extra,
)
from clipsnail.core.display import json_text
from clipsnail.core.errors import ClipsnailError
from clipsnail.core.safeio import writable
from clipsnail.data.images import default_workers

# Each handler imports what it runs (torch, faiss, the models) so that `clipsnail --help` starts at once.

log = logging.getLogger(__name__)


def add_zeroshot(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a CLIP run directory or model name (hf-hub:ORG/NAME, conse:...)")
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--templates", help="file with one prompt template per line ('{}' = class name)")
    p.add_argument("--folder", help="image folder with one subfolder per class: prints acc1/acc5/mean_per_class_recall")
    p.add_argument("images", nargs="*", help="image files")
    add_batch_size_flag(p, "images")
    add_runtime_flags(p)
    p.set_defaults(func=cmd_zeroshot)


def add_index(parser: argparse.ArgumentParser) -> None:
    index = parser.add_subparsers(dest="index_command", required=True)
    p = index.add_parser("build", help="encode every image under a folder (recursively) into an index; prints JSON")
    p.add_argument("--model", required=True, help="CLIP run directory")
    p.add_argument("--images", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="index directory (replaced atomically when it exists)")
    add_batch_size_flag(p, "photos")
    add_workers_flag(p)
    add_onnx_flag(p)
    p.add_argument("--approx-threshold", type=int,
                   help="from this many images on, search an inverted file (IVF) instead of every vector "
                        "(default 20000)")
    add_follow_links_flag(p)
    add_runtime_flags(p)
    p.set_defaults(func=cmd_index_build)
    p = index.add_parser("update", help="add new/changed images, drop deleted ones (the rest is not re-encoded)")
    p.add_argument("--index", required=True, help="index directory made by `clipsnail index build`")
    p.add_argument("--model", help="CLIP run directory (default: the one recorded in the index)")
    add_batch_size_flag(p, "photos")
    add_workers_flag(p)
    add_onnx_flag(p)
    add_runtime_flags(p)
    p.set_defaults(func=cmd_index_update)
    p = index.add_parser("info", help="what an index holds: photos, dates taken, cameras, placed photos; prints JSON")
    p.add_argument("--index", required=True, help="index directory made by `clipsnail index build`")
    p.set_defaults(func=cmd_index_info)
    p = index.add_parser("duplicates", help="groups of exact copies (same bytes) and near copies (recompressed, "
                         "resized, slightly cropped); prints JSON")
    p.add_argument("--index", required=True, help="index directory made by `clipsnail index build`")
    p.add_argument("--max-bits", type=int, default=None,
                   help="near copies: perceptual hashes at most this many of 64 bits apart (default measured: "
                        "see BENCHMARKS.md); larger finds more copies, and groups more distinct burst shots")
    p.add_argument("--grids", metavar="DIR", help="also write a grid PNG of each group into DIR")
    p.set_defaults(func=cmd_index_duplicates)
    p = index.add_parser("watch", help="keep an index up to date with its folder until interrupted (Ctrl-C); "
                         "prints a JSON line per update")
    p.add_argument("--index", required=True, help="index directory made by `clipsnail index build`")
    add_poll_flag(p)
    add_workers_flag(p)
    add_runtime_flags(p, progress=False)
    p.set_defaults(func=cmd_index_watch)


def add_poll_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poll", type=float, default=60.0, metavar="SECONDS",
                   help="compare the folder with the index at least this often, whatever file-system events say "
                        "(default 60; the only way without the watch extra, or on a network mount)")


def add_search(p: argparse.ArgumentParser) -> None:
    p.description = ("Search by a query of weighted text and image terms, added or subtracted: "
                     "`clipsnail search --index IDX \"2:golden retriever\" + ./pool.jpg - fruit`. Terms are "
                     "separated by a standalone + or - (spaces around it; a + or - inside a word is text). A term "
                     "may start with a weight, a number above 0 and a colon (2:cat, 0.5:cat). A term naming an "
                     "existing image file, or starting with ./, ../, / or ~/, is an image. The query vector is the "
                     "normalised sum of weight * term vector (negative after -). A query starting with - goes after "
                     "--, which ends the options: `clipsnail search --index IDX -- \"- fruit + cat\"`.")
    p.add_argument("--index", help="an index made by `clipsnail index build`")
    p.add_argument("--model", help="CLIP run directory (with --index: default the one recorded in the index)")
    p.add_argument("--images", help="folder to search instead of an index (embeddings cached in the run directory)")
    add_follow_links_flag(p)
    # nargs="*": the shell form `a + ./b.jpg - c` arrives as several arguments ("-" alone is one too).
    p.add_argument("query", nargs="*", help="query: text, or terms joined by + and - (see above); after -- when it "
                   "starts with -")
    p.add_argument("--image", help="query image (image-to-image search)")
    p.add_argument("-k", type=int, default=9, help="number of results (default 9)")
    p.add_argument("--grid", help="write a result grid PNG here")
    add_filter_flags(p)
    add_runtime_flags(p)
    p.set_defaults(func=cmd_search)


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    """The photo filters of a search (`clipsnail.inference.catalogue`): each optional, all combinable."""
    g = p.add_argument_group("filters", "only photos that pass every filter given; k of them whenever k pass")
    g.add_argument("--after", metavar="DATE", help="taken on or after DATE: 2019, 2019-06, 2019-06-15 or "
                   "2019-06-15T14:30 (the camera's clock)")
    g.add_argument("--before", metavar="DATE", help="taken before DATE (the start of that year, month or day)")
    g.add_argument("--camera", help="camera make or model contains this (any case): iphone, canon eos")
    g.add_argument("--folder", help="in this folder under the photo folder, or below it: trips/2019")
    g.add_argument("--near", metavar="LAT,LON,RADIUS", help="taken within RADIUS (km, or m with an m) of a place, "
                   "from the photos' GPS: 48.85,2.35,10km")


def add_workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes decoding photos while the model encodes (default {default_workers()}: one per "
                        "core, at most 8; 0: decode in the main process)")


def add_onnx_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["auto", "onnx", "torch"], default="auto",
                   help="what encodes the photos: onnx (ONNX Runtime, the run exported first) or torch; auto: an "
                        "update keeps the index's, a build takes onnx on a CPU with the onnx extra, else torch")
    p.add_argument("--quantize", choices=["none", "int8"], default=None,
                   help="int8: encode photos and queries with int8 versions of the ONNX encoders (faster, slightly "
                        "less exact; the image encoder calibrated on a sample of the photos). Default: none for a "
                        "build, the index's own for an update")
    p.add_argument("--no-onnx", action="store_true",
                   help="do not write the index's ONNX query encoder (written by default when the onnx extra is "
                        "installed: searches then answer without loading PyTorch)")


def check_index_flags(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:  # `index watch` has no --batch-size
        raise ClipsnailError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ClipsnailError(f"--workers must be 0 or more, got {args.workers}")


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="an index made by `clipsnail index build`")
    p.add_argument("--generator", help="a text-to-image run (t2i train --kind pixelsnail) for the prompt box")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to this host name (repeatable; loopback names and the "
                   "--host address always are, any IP address when --host is 0.0.0.0 or ::); other names are "
                   "refused against DNS rebinding")
    p.add_argument("--watch", action="store_true", help="follow the photo folder while serving: new, changed, "
                   "moved and deleted photos are searchable within seconds (`index watch`)")
    add_poll_flag(p)
    p.add_argument("--max-connections-per-client", type=int, default=32, metavar="N",
                   help="open connections one client address may hold (an IPv6 client: one /64); more are closed "
                   "at once (default 32; 0: no cap, e.g. behind a reverse proxy, where every client has its address)")
    add_runtime_flags(p, progress=False)
    requires_extra(p, "serve", "the web app")  # FastAPI and uvicorn
    p.set_defaults(func=cmd_serve)


def cmd_zeroshot(args: argparse.Namespace) -> None:

    from clipsnail.apps.hub import load
    from clipsnail.data.images import list_image_folder
    from clipsnail.inference.evaluate import (
        default_templates,
        encode_image_paths,
        read_templates,
        zero_shot_accuracy,
        zero_shot_probabilities,
        zero_shot_weights,
    )

    model = load(args.model, device=args.device)
    templates = read_templates(args.templates) if args.templates else default_templates()
    if args.folder:
        paths, labels, classes = list_image_folder(args.folder)
        if args.classes:  # user-given prompt names, in the sorted folder order
            names = [c.strip() for c in args.classes.split(",")]
            if len(names) != len(classes):
                raise ClipsnailError(f"--classes has {len(names)} names but {args.folder} has {len(classes)} "
                                     f"class folders ({', '.join(classes)})")
            classes = names
        image_emb, readable = encode_image_paths(model, paths, batch_size=args.batch_size,
                                                 progress=not args.no_progress)
        print_metrics(zero_shot_accuracy(image_emb, readable, labels, zero_shot_weights(model, classes, templates),
                                         class_names=classes))
        return
    if not args.images or not args.classes:
        raise ClipsnailError("zeroshot needs --classes and IMAGE files, or --folder ROOT")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    image_emb, readable = encode_image_paths(model, args.images, batch_size=args.batch_size, progress=False,
                                             strict=True)
    probs = zero_shot_probabilities(model, image_emb, zero_shot_weights(model, classes, templates))
    result = []
    for path, p in zip(args.images, probs):
        order = p.argsort(descending=True).tolist()
        result.append({"image": str(path), "label": classes[order[0]],
                       "probs": {classes[j]: round(p[j].item(), 4) for j in order}})
    print_json(result)  # a NaN probability is an error, never invalid JSON


def cmd_search(args: argparse.Namespace) -> None:
    from clipsnail.inference.catalogue import parse_filters
    from clipsnail.inference.index import ImageIndex
    from clipsnail.inference.query import Term, combine, local_image, parse_query, term_vectors

    text = " ".join(args.query) if args.query else None
    filters = parse_filters(args.after, args.before, args.camera, args.folder, args.near)
    if text is not None and args.image:
        raise ClipsnailError("search needs exactly one of: a text query, or --image FILE (not both)")
    if text is None and not args.image:
        raise ClipsnailError("search needs a text query or --image FILE")
    if args.k < 1:
        raise ClipsnailError(f"-k must be at least 1, got {args.k}")
    if bool(args.images) == bool(args.index):
        raise ClipsnailError("search needs exactly one of: --index INDEX, or --images DIR --model RUN")
    index = None
    if args.index:
        index = ImageIndex.load(args.index)
        model_dir = args.model or index.model_dir
        if model_dir is None:
            raise ClipsnailError(f"{args.index}: the index does not record its model; pass --model RUN")
    elif not args.model:
        raise ClipsnailError("search --images DIR needs --model RUN")
    else:
        model_dir = args.model
    # Before loading the model: a malformed query or a missing image term is a one-line error at once.
    terms = parse_query(text, image=local_image) if text is not None else [Term(1.0, "image", args.image)]
    encoder = onnx_query_encoder(index, args)
    if encoder is not None:  # the index's own encoder on onnxruntime: no PyTorch
        query = combine(term_vectors(terms, encoder.encode_text, encoder.encode_image), [t.weight for t in terms])
    else:
        query, index = torch_query(args, terms, index, model_dir)
    hits = index.search(query, args.k, filters)[0]
    if args.grid:
        from clipsnail.inference.plots import write_result_grid

        write_result_grid(args.grid, text or f"like {Path(args.image).name}", [(h.path, h.score) for h in hits])
    print_json([{"path": str(h.path), "score": round(h.score, 4)} for h in hits])


def onnx_query_encoder(index, args: argparse.Namespace):
    """The index's ONNX query encoder (`OnnxClip`) when this search can use it: an index that has one, no --model
    (the index's own run), the CPU (device auto or cpu) and onnxruntime installed; else None, and an index without
    one says, once, how to add it."""
    import importlib.util

    from clipsnail.apps.export import OnnxClip

    if index is None or args.model is not None or args.device not in ("auto", "cpu"):
        return None
    folder = index.query_encoder()
    if folder is None:
        log.info("%s has no ONNX query encoder: searches load PyTorch; `clipsnail index update --index %s` writes "
                 "one (with the onnx extra)", index.index_dir, index.index_dir)
        return None
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("tokenizers") is None:
        return None
    if index.weights_changed():
        log.warning("%s: the weights of %s changed since its vectors were made; answering with the vectors and the "
                    "query encoder of the old weights (`clipsnail index update --index %s` encodes them again)",
                    index.index_dir, index.model_dir, index.index_dir)
    return OnnxClip(folder)


def torch_query(args: argparse.Namespace, terms: list, index, model_dir):
    """The query vector encoded by the run's PyTorch model, and the index (`search --images`: the folder's,
    updated first)."""
    import torch

    from clipsnail.apps.hub import load
    from clipsnail.inference.index import folder_index
    from clipsnail.inference.query import combine, term_vectors

    model = load(model_dir, device=args.device)
    if index is not None and model.embed_dim != index.dim:
        raise ClipsnailError(f"dimension mismatch: {model_dir} makes dim-{model.embed_dim} embeddings, but "
                             f"{args.index} holds dim-{index.dim} vectors")
    if index is not None:
        index.check_model(model.run_dir)  # the vectors must be this run's, as its weights are now
    # The query first: a bad query image must fail before minutes of encoding the folder.
    with torch.inference_mode():
        query = combine(term_vectors(terms, model.encode_text, model.encode_image), [t.weight for t in terms])
    if index is None:
        index = folder_index(model, args.images, cache_dir=embeddings_cache(model.run_dir),
                             progress=not args.no_progress, follow_links=args.follow_links)
    return query, index


def embeddings_cache(run_dir: Path) -> Path:
    """Where `search --images DIR` keeps the folder's vectors: RUN/embeddings, or, when the run cannot be written
    (a read-only mount, someone else's run), $CLIPSNAIL_HOME/embeddings/<the run's path hashed>."""
    from clipsnail.apps.model_names import clipsnail_home

    cache = Path(run_dir) / "embeddings"
    if writable(cache):
        return cache
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    fallback = clipsnail_home() / "embeddings" / key
    log.info("%s cannot be written: keeping the vectors in %s", run_dir, fallback)
    return fallback


def cmd_index_build(args: argparse.Namespace) -> None:
    from clipsnail.inference.index import DEFAULT_APPROX_THRESHOLD, build_index

    check_index_flags(args)
    threshold = args.approx_threshold if args.approx_threshold is not None else DEFAULT_APPROX_THRESHOLD
    backend = choose_backend(args, None)
    with photo_encoder(args, args.model, Path(args.out), backend, None) as model:
        index, stats = build_index(model, args.images, args.out, batch_size=args.batch_size,
                                   progress=not args.no_progress, approx_threshold=threshold,
                                   follow_links=args.follow_links, workers=args.workers)
    stats["query_encoder"] = query_encoder_status(args, index.index_dir, backend, reused=False)
    print_json({"index": str(index.index_dir), **stats, "backend": backend, "structure": index.structure})


def choose_backend(args: argparse.Namespace, recorded: str | None) -> str:
    """What encodes the photos: "torch", "onnx" or "onnx-int8" (--backend, --quantize); auto = the index's own
    (an update: another one asked for is refused), else ONNX Runtime on the CPU when the onnx extra is installed (and
    --no-onnx is not given), else PyTorch."""
    from clipsnail.apps.export import onnx_backend_available

    asked = args.backend
    if args.quantize == "int8":
        if asked == "torch":
            raise ClipsnailError("--quantize int8 runs through ONNX Runtime: not with --backend torch")
        asked = "onnx-int8"
    elif args.quantize == "none" and asked == "auto" and recorded == "onnx-int8":
        asked = "onnx"
    if asked != "auto":
        if asked.startswith("onnx") and not onnx_backend_available():
            raise ClipsnailError(f"--backend {asked} needs the onnx extra: pip install 'clipsnail[onnx]'")
        if recorded is not None and asked != recorded:
            raise ClipsnailError(f"{args.index} holds vectors encoded through {recorded}; an update encodes through "
                                 f"the same (not {asked}): {_backend_flags(recorded)}, or build the index again")
        return asked
    if recorded is not None:
        return recorded
    on_cpu = args.device == "cpu" or (args.device == "auto" and not _accelerator())
    return "onnx" if on_cpu and not args.no_onnx and onnx_backend_available() else "torch"


def _backend_flags(backend: str) -> str:
    return {"onnx-int8": "--backend onnx --quantize int8", "onnx": "--backend onnx --quantize none"}.get(
        backend, f"--backend {backend}")


def _accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


@contextlib.contextmanager
def photo_encoder(args: argparse.Namespace, model_spec, index_dir: Path, backend: str, index):
    """The model `index build` / `index update` encodes photos with: the run in PyTorch, or (backend "onnx") its
    ONNX export: the index's query encoder when it is of the run's weights now, else a new export, which becomes
    the index's query encoder once the photos are encoded."""
    from clipsnail.apps.hub import load

    if backend == "torch":
        yield load(model_spec, device=args.device)
        return
    from clipsnail.apps.export import OnnxImageModel, export_onnx, own_photo_model
    from clipsnail.apps.model_names import resolve_run
    from clipsnail.core.fingerprint import weights_fingerprint
    from clipsnail.core.safeio import replace_dir, temp_sibling
    from clipsnail.inference.index import QUERY_ENCODER, set_query_encoder

    run_dir = resolve_run(model_spec).resolve()
    own = own_photo_model(index, run_dir) if index is not None and not index.weights_changed() else None
    if own is not None and own.backend == backend:
        yield own
        return
    staging = temp_sibling(index_dir.absolute(), "tmp")  # beside the index: moved into it, not copied
    try:
        weights = weights_fingerprint(run_dir)
        export_onnx(run_dir, staging)
        if backend == "onnx-int8":
            from clipsnail.apps.quantize import quantize_for_photos

            root, follow = ((index.root, index.follow_links) if index is not None
                            else (Path(args.images), args.follow_links))
            quantize_for_photos(staging, root, follow_links=follow)
        yield OnnxImageModel(staging, run_dir, weights)
        replace_dir(staging, index_dir / QUERY_ENCODER)
        set_query_encoder(index_dir, weights)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def query_encoder_status(args: argparse.Namespace, index_dir: Path, backend: str, reused: bool) -> str:
    """What became of the index's query encoder: through the onnx backend, the export that encoded the photos took
    its place (or the index's own did the encoding: `reused`); through torch, one is written now (`--no-onnx`: not)."""
    from clipsnail.apps.export import ensure_query_encoder

    if backend.startswith("onnx"):
        return "kept" if reused else "written"
    return "not written: --no-onnx" if args.no_onnx else ensure_query_encoder(index_dir)


def cmd_index_update(args: argparse.Namespace) -> None:
    from clipsnail.inference.index import ImageIndex, update_index

    check_index_flags(args)
    old = ImageIndex.load(args.index)
    model_dir = args.model or old.model_dir
    if model_dir is None:
        raise ClipsnailError(f"{args.index}: the index does not record its model; pass --model RUN")
    backend = choose_backend(args, old.meta.get("backend", "torch"))
    reused = old.query_encoder() is not None and not old.weights_changed()
    with photo_encoder(args, model_dir, Path(args.index), backend, old) as model:
        index, stats = update_index(model, args.index, batch_size=args.batch_size, progress=not args.no_progress,
                                    workers=args.workers)
    stats["query_encoder"] = query_encoder_status(args, index.index_dir, backend, reused)
    print_json({"index": str(index.index_dir), **stats, "backend": backend})


def cmd_index_info(args: argparse.Namespace) -> None:
    from clipsnail.inference.index import ImageIndex

    index = ImageIndex.load(args.index)
    info = {"index": str(index.index_dir), "root": str(index.root), "model": str(index.model_dir), "dim": index.dim,
            "photos": len(index), "unreadable": index.meta.get("num_unreadable", 0), "structure": index.structure,
            "vector_rows": index.meta["rows"], "created": index.meta.get("created"),
            "updated": index.meta.get("updated")}
    info.update({k: v for k, v in index.catalogue.summary().items() if k != "photos"})
    print_json(info)


def cmd_index_duplicates(args: argparse.Namespace) -> None:
    from clipsnail.inference.duplicates import DEFAULT_MAX_BITS, find_duplicates
    from clipsnail.inference.index import ImageIndex
    from clipsnail.inference.plots import write_result_grid

    index = ImageIndex.load(args.index)
    found = find_duplicates(index, DEFAULT_MAX_BITS if args.max_bits is None else args.max_bits)
    if args.grids:
        groups = [("exact", g) for g in found["exact"]] + [("near", g["paths"]) for g in found["near"]]
        found["grids"] = [str(write_result_grid(Path(args.grids) / f"{kind}_{n:04d}.png", f"{kind} copies",
                                                [(index.root / p, 1.0) for p in paths[:9]]))
                          for n, (kind, paths) in enumerate(groups)]
    print_json(found)


def cmd_serve(args: argparse.Namespace) -> None:
    # Imported here: the web stack (FastAPI, uvicorn) is needed by this command only, and would add ~0.2 s to
    # the start of every other one.
    from clipsnail.serve import run_server

    run_server(index=args.index, generator=args.generator, host=args.host, port=args.port, device=args.device,
               allow_hosts=args.allow_host, max_connections_per_client=args.max_connections_per_client,
               watch=args.watch, poll_seconds=args.poll)


def cmd_index_watch(args: argparse.Namespace) -> None:
    import threading

    from clipsnail.apps.hub import load
    from clipsnail.inference.index import ImageIndex
    from clipsnail.inference.watch import watch_index

    check_index_flags(args)
    index = ImageIndex.load(args.index)
    if index.model_dir is None:
        raise ClipsnailError(f"{args.index}: the index does not record its model; update it once with --model RUN")
    from clipsnail.apps.export import photo_model_of

    model = photo_model_of(index, load(index.model_dir, device=args.device))

    def said(new, stats) -> None:  # one line per update: a stream another program can read as it comes
        print(json_text({"index": str(new.index_dir), **stats}, indent=None), flush=True)

    stop = threading.Event()
    try:
        watch_index(model, args.index, stop, on_update=said, poll_seconds=args.poll, workers=args.workers)
    except KeyboardInterrupt:
        stop.set()
