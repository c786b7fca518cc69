"""The `clipsnail` command. Library code logs; this package is the only place that prints.

One module per command group, each with a function adding a command's flags (`add_clip`, ...) next to its handlers:
`data` (data shapes, data shards), `clip` (clip train, eval, summary), `classify`, `pixelsnail`, `t2i` (t2i train,
t2i generate), `caption` (caption train, eval, describe), `search` (zeroshot, index build/update, search, serve),
`convert` (convert, export), `demo`; the flags and output they share are in `common`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import select
import sys

from clipsnail import __version__
from clipsnail.core.display import PrintableFilter, printable
from clipsnail.core.errors import ClipsnailError
from clipsnail.core.safeio import DISK_ERRNOS

# faiss prints one "Could not load library with AVX512 support" INFO line per attempt; PIL its plugins.
QUIET_LOGGERS = ("PIL", "faiss", "faiss.loader", "transformers", "huggingface_hub", "timm", "urllib3", "filelock")

# Every command, in the order `clipsnail --help` lists them: its module in this package, the function there that
# adds its flags, its one-line help. Only the module of the command being run is imported (it imports torch, timm
# and the models where it runs them), so `clipsnail --help` answers at once instead of after seconds of imports.
COMMANDS = {
    "demo": ("demo", "add_demo", "generate shapes data, train a small CLIP, evaluate and search (minutes on a CPU: "
                                 "BENCHMARKS.md); with --photos DIR: search your own photos by text"),
    "data": ("data", "add_data", "built-in datasets and downloads, caption corpora as WebDataset shards"),
    "clip": ("clip", "add_clip", "train, evaluate and inspect CLIP models"),
    "classify": ("classify", "add_classify", "train and evaluate image classifiers (LeMeViT or any timm model)"),
    "pixelsnail": ("pixelsnail", "add_pixelsnail", "autoregressive image model: train, bits/dim, sample"),
    "t2i": ("t2i", "add_t2i", "text to image: train a feature predictor or a text-conditioned PixelSNAIL"),
    "generate": ("t2i", "add_generate_alias", "the old name of `t2i generate`"),
    "caption": ("caption", "add_caption",
                "image captioning: train a caption decoder on a frozen image tower; caption images"),
    "zeroshot": ("search", "add_zeroshot", "zero-shot classification with prompt ensembles"),
    "index": ("search", "add_index", "a saved, searchable index of an image folder (faiss)"),
    "search": ("search", "add_search", "search an index or an image folder by text (or by an image); prints JSON"),
    "export": ("convert", "add_export", "export a CLIP run's image and text encoders to ONNX (runs on onnxruntime "
                                        "without PyTorch); prints JSON"),
    "serve": ("search", "add_serve", "the web app: text and image search over an index, zero-shot labels, "
                                     "generation"),
    "convert": ("convert", "add_convert", "pretrained OpenAI/open_clip CLIP (ViT) or official LeMeViT weights, or a "
                                          "ConSE CLIP of the packaged models -> a run directory; prints JSON"),
}


# What an option's name looks like (-k, --index, --set=x); any other word starting with - that argparse could not
# place is a value, such as a search query "-0:dog" or "-fruit", which argparse takes for an unknown option.
_OPTION_NAME = re.compile(r"--?[A-Za-z][\w-]*(=.*)?", re.S)


class Parser(argparse.ArgumentParser):
    """argparse, whose 'unrecognized arguments' error says how to pass a value that starts with '-'."""

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            words = message[len(prefix):].split(" ")
            values = [a for a in words if a.startswith("-") and not _OPTION_NAME.fullmatch(a)]
            if values:
                message += (f" (a value that starts with '-' goes after '--', which ends the options: "
                            f"clipsnail search --index IDX -- {values[0]!r})")
        super().error(message)


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The whole command line, or (`commands`: the names to fill in) one where the other commands are names and help
    lines only, which is all `clipsnail --help` and `clipsnail COMMAND ...` need of them."""
    parser = Parser(
        prog="clipsnail",
        description="CLIP from scratch: train on captioned images, search images by text, classify with no labels; "
                    "LeMeViT and any timm model as image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, the INFO lines of the libraries underneath (faiss, transformers) too")
    parser.add_argument("--version", action="version", version=f"clipsnail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, add_flags, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if commands is None or name in commands:
            getattr(importlib.import_module(f"clipsnail.cli.{module}"), add_flags)(command)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command word of `argv`: its first argument that is not a flag (the top-level flags take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(commands=[command_of(argv)]).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # file names in log lines cannot carry terminal escapes
        if not any(isinstance(f, PrintableFilter) for f in handler.filters):
            handler.addFilter(PrintableFilter())
    if not args.verbose:  # what the libraries underneath say at INFO is noise to a user of this command
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    owns_group = False
    try:
        if getattr(args, "required_extra", None):  # e.g. training without its extra: one line naming the pip install
            from clipsnail.core.extras import require_extra

            require_extra(*args.required_extra)
        # Under torchrun every process runs this command; joining the group before the task is built lets rank 0
        # train the tokenizer once and share it. (Imported only then: torch.distributed imports torch, which a
        # search through ONNX Runtime never needs.)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from clipsnail.core import distributed

            owns_group = distributed.init_from_env()
        args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at exit
    except ClipsnailError as e:
        print(f"clipsnail: error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training says where it stopped and how to resume (errors.Interrupted)
        print(f"clipsnail: {printable(e)}" if str(e) else "clipsnail: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`clipsnail search ... | head`): stop quietly, as `cat` does. Another
        # pipe (a worker's, a socket) breaking is a real error; a closed stdout polls as POLLERR.
        if not _stdout_closed():
            raise
        # Python's recipe: point stdout at devnull, so that the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a program that SIGPIPE ended
    except OSError as e:  # a full or read-only disk met outside the atomic writers (an appended log, a mkdir)
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"clipsnail: error: {printable(e.filename or '')}: {e.strerror}; what was there before is kept. "
              f"Free some space (or write elsewhere) and run the command again", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            from clipsnail.core import distributed

            distributed.shutdown()
    return 0


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone (poll reports POLLERR); True where poll is missing."""
    try:
        closed = True
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sys.stdout.fileno(), select.POLLOUT)
            closed = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # stdout replaced by an object without a file
        closed = False
    return closed
