"""The `clipsnail` command. Library code logs; this package is the only place that prints.

One module per command group, each adding its subcommands (`register`) next to their handlers: `data` (data shapes,
data shards), `clip` (clip train, eval, summary), `classify`, `pixelsnail`, `t2i` (t2i train, generate), `caption`
(caption train, eval, describe), `search`
(zeroshot, index build/update, search, serve), `convert` (convert, export), `demo`; the flags and output they share
are in `common`.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys

from clipsnail import __version__
from clipsnail import distributed as dist
from clipsnail.cli import caption, classify, clip, convert, data, demo, pixelsnail, search, t2i
from clipsnail.display import PrintableFilter, printable
from clipsnail.errors import ClipsnailError
from clipsnail.safeio import DISK_ERRNOS

# faiss prints one "Could not load library with AVX512 support" INFO line per attempt; PIL its plugins.
QUIET_LOGGERS = ("PIL", "faiss", "faiss.loader", "transformers", "huggingface_hub", "timm", "urllib3", "filelock")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipsnail",
        description="CLIP from scratch: train on captioned images, search images by text, classify with no labels; "
                    "LeMeViT and any timm model as image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, the INFO lines of the libraries underneath (faiss, transformers) too")
    parser.add_argument("--version", action="version", version=f"clipsnail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # in the order `clipsnail --help` lists the commands
    for register in (demo.register, data.register, clip.register, classify.register, pixelsnail.register,
                     t2i.register, caption.register, search.register, convert.register_export, search.register_serve,
                     convert.register_convert):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(caption.route(sys.argv[1:] if argv is None else list(argv)))
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
        # Under torchrun every process runs this command; joining the group before the task is built lets rank 0
        # train the tokenizer once and share it.
        owns_group = dist.init_from_env()
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
            dist.shutdown()
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
