"""Safe file IO: writes that survive kill -9, folder swaps that never leave nothing behind, and reads that open
only regular files, of bounded size, under the folder the user named.

Writing. A file is written to a temp sibling `.NAME.tmp-PID-RANDOM` and renamed over NAME (`atomic_write_*`); a
folder is built in a temp sibling and swapped in (`staged_dir`, `replace_dir`). On Linux the swap is one
`renameat2(RENAME_EXCHANGE)`: at every instant NAME is either the whole old folder or the whole new one. Where the
kernel or filesystem cannot exchange, it is two renames (NAME -> `.NAME.old-PID-RANDOM`, temp -> NAME); a kill
between them leaves NAME missing and the old folder whole beside it, and `recover_dir` (run before every read and
write of such a folder) renames it back. Temp and old siblings left by a killed process (its PID no longer runs) are
deleted by the next write of the same NAME, so a kill during a 44 MB checkpoint write does not leave it for good.

Reading. `open_regular` opens without blocking and checks what it opened, so a FIFO (which would block `open`
forever), a device such as /dev/zero (which never ends) or a socket named `x.jpg` is refused at once, and
`read_regular` stops past `max_bytes`, so a file that lies about its size or grows while read cannot exhaust memory.
`resolve_under` keeps a path inside a root: absolute names, `..` and symbolic links leading out are refused, and
links are followed only when asked (`follow_links`) and then only to targets still under the root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from clipsnail.core.errors import ClipsnailError, DataError

try:
    import fcntl
except ImportError:  # not POSIX: no locks; every write is still atomic, only two writers are not kept apart
    fcntl = None

# One image file is read whole to be decoded; nothing a camera or a scanner writes comes near this.
MAX_IMAGE_FILE_BYTES = 256 * 2**20

# ----------------------------------------------------------------------------------------------- temp siblings

_TAG = re.compile(r"(tmp|old)-(\d+)-[0-9a-f]+")
# Names of earlier versions' temp files (".NAME.PID.tmp"), so their leftovers are cleaned too.
_LEGACY_TAG = re.compile(r"(\d+)\.tmp")


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """`.NAME.KIND-PID-RANDOM` beside `path`: a name `clean_stale` recognises once its writer is gone."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _leftovers(path: Path) -> list[tuple[Path, str, int]]:
    """(sibling, "tmp" | "old", pid) for each temp or old sibling of `path` whose writer is no longer running."""
    prefix = f".{path.name}."
    found = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        match = _TAG.fullmatch(rest)
        if match:
            kind, pid = match.group(1), int(match.group(2))
        elif _LEGACY_TAG.fullmatch(rest):
            kind, pid = "tmp", int(_LEGACY_TAG.fullmatch(rest).group(1))
        else:
            continue
        if not _pid_alive(pid):
            found.append((path.parent / name, kind, pid))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale(path: str | Path) -> list[Path]:
    """Delete the temp siblings of `path` left by writers that were killed; returns what was deleted. An old
    folder is kept while `path` is missing: `recover_dir` needs it."""
    path = Path(path)
    removed = []
    for sibling, kind, _ in _leftovers(path):
        if kind == "old" and not os.path.lexists(path):
            continue
        _remove(sibling)
        removed.append(sibling)
    return removed


def recover_dir(path: str | Path) -> bool:
    """If a swap of the folder `path` was killed between its two renames, put the old folder back. Returns True
    when it did. Harmless to call on any path; it never touches a swap whose process still runs."""
    path = Path(path)
    if os.path.lexists(path):
        return False
    olds = sorted((p for p, kind, _ in _leftovers(path) if kind == "old" and p.is_dir()),
                  key=lambda p: p.stat().st_mtime_ns)
    if not olds:
        return False
    try:
        os.rename(olds[-1], path)
    except OSError:  # read-only, or someone else recovered it first
        return os.path.isdir(path)
    return True


# ----------------------------------------------------------------------------------------------- writing files


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a regular file we just wrote the mode a plain open() would have (0666 less the umask): safetensors
    writes 0600 whatever the umask, so weights and vectors were unreadable to the others who share a run or index
    while the files beside them were not."""
    if path.is_file() and not path.is_symlink():
        with contextlib.suppress(OSError):
            os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; when the block ends without an error it is renamed over `path` (and the
    leftovers of killed writers of `path` are deleted). On an error the temp file is removed; a full or read-only
    disk is a DiskError saying that `path` was kept."""
    path = Path(path)
    clean_stale(path)
    tmp = temp_sibling(path, "tmp")
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        problem = disk_error(e, path)
        if problem is not None:
            raise problem from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj, indent: int | None = 2, **dumps) -> None:
    """`obj` as a JSON file ending in a newline (indented for a person to read by default; `dumps`: more
    json.dumps options), replaced atomically like every file this package writes."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


# What a full, over-quota, read-only or failing disk raises (as errno, or in a library's message: faiss's "write
# error ... No space left on device", safetensors' "os error 28").
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


class DiskError(ClipsnailError):
    """A write failed for want of disk: the message names what was being written and says what was kept."""


def disk_error(e: BaseException, target: str | Path) -> DiskError | None:
    """The one-line DiskError for a write of `target` that `e` ended, when `e` is a disk problem; else None."""
    if isinstance(e, DiskError):
        return e
    code = getattr(e, "errno", None)
    if code not in DISK_ERRNOS:
        text = str(e)
        code = next((c for c in DISK_ERRNOS if os.strerror(c) in text or f"os error {c})" in text), None)
    if code is None:
        return None
    target = Path(target)
    kept = (f"the previous {target.name} is kept as it was" if os.path.lexists(target)
            else "nothing was left half-written")
    return DiskError(f"{target}: cannot be written: {os.strerror(code)} (in {target.parent}); {kept}. Free some "
                     f"space (or write elsewhere) and run the command again")


def check_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """DiskError before the work starts when the disk holding `folder` (or its nearest existing parent) has less
    than `needed_bytes` free: minutes of encoding should not end in a write that cannot succeed."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell: let the write itself say
    if free < needed_bytes:
        raise DiskError(f"{folder}: {what} needs about {needed_bytes / 2**20:.0f} MiB, but only "
                        f"{free / 2**20:.0f} MiB are free on that disk; nothing was written")


def writable(folder: str | Path) -> bool:
    """Whether files can be created in `folder` (made if missing): tried, not guessed from permission bits, which
    neither a read-only mount nor root's rights show the same way."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_sibling(folder / "probe", "tmp")
        probe.touch()
        probe.unlink()
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- swapping folders


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the kernel or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staged: Path, out: Path) -> None:
    """Put the finished folder `staged` at `out` (module docstring: one atomic exchange, or two renames that
    `recover_dir` repairs after a kill). The previous `out` is deleted after. Callers check first that an existing
    `out` is theirs to replace."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if not os.path.lexists(out):
        os.rename(staged, out)
        return
    if exchange(staged, out):
        shutil.rmtree(staged, ignore_errors=True)  # now the old folder; a kill here leaves a stale temp to clean
        return
    old = temp_sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(staged, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)  # an open memory map of a file in it stays valid


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object: how a folder's marker file
    (an index's index.json, an export's preprocess.json...) is read to decide whether this program wrote it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_replaceable(out: str | Path, is_ours: Callable[[Path], bool] | None = None, what: str = "folder") -> None:
    """DataError unless `out` is absent, an empty folder, or a folder `is_ours(out)` recognises as one this
    program wrote (an index, an export...). `what` names that kind of folder in the error."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; refusing to replace it")
    if any(out.iterdir()) and not (is_ours is not None and is_ours(out)):
        kind = f" and is not a {what}" if is_ours is not None else ""
        raise DataError(f"{out}: exists, is not empty{kind}; refusing to replace it (choose another path)")


@contextlib.contextmanager
def staged_dir(out: str | Path, is_ours: Callable[[Path], bool] | None = None,
               what: str = "folder") -> Iterator[Path]:
    """Yields an empty temp folder beside `out`; when the block ends without an error it replaces `out`.

    `out` is checked by `check_replaceable` before work starts and again just before the swap, so a user's folder
    is never deleted. A swap of `out` killed earlier is repaired first (`recover_dir`), and its leftovers deleted."""
    out = Path(out).absolute()
    recover_dir(out)
    clean_stale(out)
    check_replaceable(out, is_ours, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            honour_umask(file)
        check_replaceable(out, is_ours, what)
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = disk_error(e, out)
        if problem is not None:
            raise problem from None
        raise


# ----------------------------------------------------------------------------------------------- reading


class FileRefused(DataError):
    """A file that cannot or may not be read: `reason` says why ("a FIFO, not a regular file; not read")."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def file_kind(mode: int) -> str:
    """What a stat mode that is not a regular file is, in words ("a FIFO", "a device"...)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "an unusual file"


def _fd_path(fd: int) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return None


def is_under(path: str, root: str) -> bool:
    """`path` is `root` or inside it (both absolute, resolved; compared by name)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def open_regular(path: str | Path, root: str | Path | None = None, follow_links: bool = True) -> int:
    """A read-only file descriptor of the regular file `path`, or DataError. Never blocks: opened O_NONBLOCK, then
    checked, so FIFOs, devices and sockets are refused. root: the file must lie under it once opened (checked on
    the opened file itself where /proc shows it, so a link swapped in after a check cannot lead elsewhere).
    follow_links=False refuses a symbolic link as the last path component."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileRefused(path, "a symbolic link (not followed)") from None
        raise FileRefused(path, f"cannot open: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(path, f"{file_kind(mode)}, not a regular file; not read")
        if root is not None:
            real = _fd_path(fd) or os.path.realpath(path)
            if not is_under(real, os.path.realpath(root)):
                raise FileRefused(path, f"leads outside {root}; not read")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, max_bytes: int = MAX_IMAGE_FILE_BYTES, root: str | Path | None = None,
                 follow_links: bool = True) -> bytes:
    """The bytes of the regular file `path` (see `open_regular`), at most `max_bytes`: a larger file, or one that
    grows past the limit while it is read, is a DataError."""
    fd = open_regular(path, root, follow_links)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise FileRefused(path, f"{size:,} bytes, over the limit of {max_bytes:,}; not read")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRefused(path, f"grew past the limit of {max_bytes:,} bytes while read; not read")
    return data


def resolve_under(root: str | Path, name: str | Path, follow_links: bool = False) -> Path:
    """root / name, checked to stay under root: an absolute name, `..` leading out, or a symbolic link on the
    way is a DataError (with follow_links, links are allowed when what they lead to is still under root).
    Returns the path as root / name (normalised), not the link's target."""
    root = Path(root)
    name = str(name)
    if os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{name!r}: an absolute path; image names must be relative to {root}")
    real_root = os.path.realpath(root)
    joined = os.path.normpath(os.path.join(real_root, name))
    if not is_under(joined, real_root) or joined == real_root:
        raise DataError(f"{name!r}: leads outside {root}")
    real = os.path.realpath(joined)
    if real != joined:  # a symbolic link somewhere below the root
        if not follow_links:
            raise DataError(f"{root / name}: a symbolic link (links are followed only with --follow-links)")
        if not is_under(real, real_root):
            raise DataError(f"{root / name}: a symbolic link leading outside {root}")
    return root / os.path.relpath(joined, real_root)


def regular_file_kind(path: str | Path, follow_links: bool = True) -> str | None:
    """None when `path` is a regular file (after links when follow_links), else what it is ("a FIFO", "a symbolic
    link", "missing"...), without opening it."""
    try:
        st = os.stat(path, follow_symlinks=follow_links)
    except OSError as e:
        return "missing" if e.errno == errno.ENOENT else (e.strerror or str(e))
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    return None if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)


class Busy(ClipsnailError):
    """Another process holds the lock of the folder this one would write."""


def _open_lock_file(path: Path, what: str):
    """The lock file `path`, opened for reading and writing (created if missing), as a file object. Never through a
    symbolic link (O_NOFOLLOW: a link planted at the lock's name would otherwise have its target truncated), and
    only a regular file: anything else is one line naming it, to be removed by the user."""
    flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        reason = {errno.ELOOP: "is a symbolic link", errno.EISDIR: "is a folder",
                  errno.EACCES: "cannot be written", errno.EPERM: "cannot be written"}.get(e.errno)
        raise DataError(f"{path} cannot be used as this {what}'s lock ({reason or e.strerror or e}); "
                        "remove it") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path} cannot be used as this {what}'s lock (is {file_kind(mode)}); remove it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "r+")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def writer_lock(folder: str | Path, what: str = "folder", wait: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on `folder` while the block writes it: a lock file `.NAME.lock` beside it (the
    folder itself may be swapped whole) holding the writer's pid, removed at the end. The kernel releases the lock
    when the process dies, so a kill -9 leaves at most an unlocked file that the next writer takes over. A second
    writer waits when `wait`, or else stops with Busy naming the pid of the first: two trainings into one run
    would interleave their logs and pair one's config with the other's weights. A symbolic link, a folder or any
    other non-regular file at the lock's name is refused, never written through."""
    folder = Path(folder)
    if fcntl is None:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(f".{folder.name}.lock")
    while True:
        f = _open_lock_file(path, what)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            pid = f.read(20).strip() or "?"
            f.close()
            raise Busy(f"{folder}: another clipsnail (pid {pid}) is writing this {what}; wait for it to finish, "
                       f"or write elsewhere") from None
        except OSError:  # a filesystem without locks (some network mounts): writes stay atomic, only unguarded
            f.close()
            yield
            return
        try:
            same = os.lstat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder removed the file it locked while this process waited: lock the current one
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a waiter then sees another inode and starts over
        f.close()
