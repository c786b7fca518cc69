"""`clipsnail convert` (pretrained OpenAI/open_clip CLIP or LeMeViT weights -> a run directory) and `clipsnail export`
(a CLIP run -> ONNX)."""

from __future__ import annotations

import argparse
import logging

from clipsnail.apps.convert import (
    CONSE_DEFAULT,
    CONSE_TEMPERATURE,
    CONSE_TEMPLATE,
    CONSE_TOP_K,
    convert_conse,
    convert_lemevit,
    convert_open_clip,
    read_class_names,
)
from clipsnail.apps.export import export_onnx
from clipsnail.cli.common import add_arch_flag, print_json
from clipsnail.core.errors import ClipsnailError
from clipsnail.core.extras import require_extra


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="CLIP run directory")
    p.add_argument("--onnx", required=True, metavar="DIR", help="output folder: image_encoder.onnx, "
                   "text_encoder.onnx, tokenizer.json, preprocess.json (replaced atomically when it exists)")
    p.add_argument("--opset", type=int, help="ai.onnx opset version (default: the exporter's; below 18 the "
                   "TorchScript exporter is used)")
    p.set_defaults(func=cmd_export)


def add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="KIND:PATH",
                   help="open_clip:FILE (.safetensors, or a .bin/.pt state dict), lemevit:FILE (.pth), or "
                        f"conse:IMAGE+TEXT (a zero-shot CLIP from an ImageNet classifier and a sentence encoder, "
                        f"e.g. conse:{CONSE_DEFAULT})")
    p.add_argument("--out", required=True, help="run directory to create (must not exist, or be empty)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="open_clip: the weights use QuickGELU (OpenAI's models); default: open_clip_config.json "
                        "next to the file, else no")
    add_arch_flag(p, "lemevit: the architecture (lemevit_tiny, lemevit_small, lemevit_base)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="lemevit: the EMA weights (state_dict_ema, default; the official evaluation's) or the raw ones")
    p.add_argument("--num-classes", type=int, help="lemevit: expected classes (default: the checkpoint's head)")
    p.add_argument("--class-names", help="lemevit: file with one class name per line (default class_0, class_1, ...)")
    p.add_argument("--top-k", type=int, default=CONSE_TOP_K,
                   help=f"conse: the most probable labels combined into an image embedding (default {CONSE_TOP_K})")
    p.add_argument("--temperature", type=float, default=CONSE_TEMPERATURE,
                   help=f"conse: the classifier's softmax temperature (default {CONSE_TEMPERATURE:g})")
    p.add_argument("--template", default=CONSE_TEMPLATE,
                   help=f"conse: how a label is put into words for the text encoder (default {CONSE_TEMPLATE!r})")
    p.set_defaults(func=cmd_convert)


def cmd_export(args: argparse.Namespace) -> None:
    require_extra("onnx", "export --onnx")
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter logs every optimisation pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    print_json(export_onnx(args.model, args.onnx, opset=args.opset))


def cmd_convert(args: argparse.Namespace) -> None:
    kind, sep, path = args.source.partition(":")
    if not sep or not path:
        raise ClipsnailError(f"--from {args.source!r}: expected open_clip:PATH, lemevit:PATH or conse:IMAGE+TEXT")
    conse_options = {"top_k": args.top_k, "temperature": args.temperature, "template": args.template}
    if kind != "conse" and (args.top_k, args.temperature, args.template) != (CONSE_TOP_K, CONSE_TEMPERATURE,
                                                                            CONSE_TEMPLATE):
        raise ClipsnailError("--top-k, --temperature and --template apply to conse:IMAGE+TEXT only")
    if kind == "conse":
        if args.arch or args.class_names or args.num_classes is not None or args.quick_gelu is not None:
            raise ClipsnailError("conse:IMAGE+TEXT takes --top-k, --temperature and --template only")
        print_json(convert_conse(path, args.out, **conse_options))
        return
    if kind == "open_clip":
        if args.arch or args.class_names or args.num_classes is not None or args.weights != "ema":
            raise ClipsnailError("--arch, --num-classes, --class-names and --weights apply to lemevit:PATH only")
        print_json(convert_open_clip(path, args.out, quick_gelu=args.quick_gelu))
    elif kind == "lemevit":
        if not args.arch:
            raise ClipsnailError("lemevit:PATH needs --arch (lemevit_tiny, lemevit_small or lemevit_base)")
        if args.quick_gelu is not None:
            raise ClipsnailError("--quick-gelu / --no-quick-gelu apply to open_clip:PATH only")
        names = read_class_names(args.class_names) if args.class_names else None
        print_json(convert_lemevit(path, args.out, args.arch, num_classes=args.num_classes, weights=args.weights,
                                   class_names=names))
    else:
        raise ClipsnailError(f"--from {args.source!r}: unknown source {kind!r}; choose open_clip:PATH, "
                             "lemevit:PATH or conse:IMAGE+TEXT")
