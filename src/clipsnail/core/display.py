"""Text from outside (file names above all) made safe to show: in a terminal line, in a log, in a JSON answer.

A file may be named with terminal escape sequences (ESC [2J clears the screen), with a newline that forges a log
line, or with bytes that are not UTF-8 (Python keeps those as lone surrogates, which neither a UTF-8 terminal nor a
JSON encoder accepts). Nothing here changes which file is meant: only how its name is shown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys

from clipsnail.core.errors import DataError

# C0 and C1 control characters (newline and tab too) and lone surrogates.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_UNPRINTABLE_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by the file-system encoding (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, keep_lines: bool = False) -> str:
    r"""str(text) with every control character and undecodable byte written as an escape ("\x1b", "\xff"), so
    that printing it cannot move the cursor, clear the screen or start a new line. keep_lines: newlines and tabs
    stay (a message of ours that spans lines)."""
    return (_UNPRINTABLE_BUT_LINES if keep_lines else _UNPRINTABLE).sub(_escape, str(text))


def print_lines(*lines: object, file=None) -> None:
    """Prints each of `lines` as exactly one line (stdout unless `file`): a newline or a terminal escape inside one
    (a file's name, a folder given on the command line) is shown escaped, so that no name can forge a line of
    output. A message of several lines is passed as several lines."""
    for line in lines:
        print(printable(line), file=file or sys.stdout, flush=True)


def display_name(name: str) -> str:
    """A file name as a JSON answer or a web page shows it: bytes that are not UTF-8 become U+FFFD (the name is
    lossy, the file is still named by its id); control characters are kept, as JSON escapes them."""
    try:
        return os.fsencode(name).decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from the file system
        return name.encode("utf-8", "replace").decode("utf-8")


def json_text(obj, indent: int | None = 2) -> str:
    """`obj` as JSON text, refusing NaN and infinity: json.dumps writes them as NaN / Infinity, which no JSON
    parser reads, so an answer computed from damaged weights would look like a result and break whatever reads
    it. The error says where the number is ([0].probs.dog). ASCII: control characters and undecodable bytes come
    out escaped."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        where = _non_finite(obj, "")
        if where is None:  # another ValueError (a circular reference): not ours to word
            raise
        raise DataError(f"the answer holds a number that is not finite at {where or 'the top level'} (NaN or "
                        "infinity, computed from weights or inputs that hold one); nothing printed") from None


def _non_finite(obj, where: str) -> str | None:
    """The path of the first float in `obj` that is NaN or infinite, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


class PrintableFilter(logging.Filter):
    """Escapes what a log record interpolates (file names, exception messages) and then its whole message except
    its own line breaks: no log line can carry a terminal escape or forge another line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            if not (len(args) == 1 and isinstance(args[0], dict)):
                record.args = tuple(printable(a) if isinstance(a, (str, os.PathLike, BaseException)) else a
                                    for a in args)
        record.msg = printable(record.getMessage(), keep_lines=True)
        record.args = None
        return True
