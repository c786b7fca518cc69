"""The catalogue of a photo index: one SQLite row per photo (the standard library's sqlite3, WAL mode, one file),
and the filters a search is restricted by (date taken, camera, folder, a circle on the map).

A row holds what the file is (path relative to the photo root, size, mtime, content hash), what its EXIF says
(`clipsnail.data.photo_facts`: date taken and where that date came from, camera make and model, GPS position, pixel
size, orientation) and `id`, the row of its vector in the index. `Filters.where` turns the filters into one SQL
condition, so a filtered search asks the catalogue which ids match and searches those, not the first hits of an
unfiltered search.

Dates are compared as the camera's clock showed them ("YYYY-MM-DDTHH:MM:SS", local time), as people remember
their photos: `--after 2019-06` keeps photos taken on or after 1 June 2019 by the clock of wherever they were
taken. `after` is inclusive and `before` exclusive, each at the start of the period it names.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsnail.core.errors import ClipsnailError, DataError
from clipsnail.data.photo_facts import PhotoFacts, read_photo_facts

SCHEMA_VERSION = 2  # 1: no index state, no vector rows (an index of format 1 upgrades it whole)
EARTH_RADIUS_KM = 6371.0088  # the mean radius (IUGG)

COLUMNS = ("id", "row", "path", "folder", "size", "mtime_ns", "sha1", "taken", "taken_offset", "taken_source", "make",
           "model", "camera", "latitude", "longitude", "width", "height", "orientation", "phash")
SCHEMA = """
CREATE TABLE IF NOT EXISTS catalogue_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row INTEGER NOT NULL UNIQUE,
    path BLOB NOT NULL UNIQUE,
    folder TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha1 TEXT NOT NULL,
    taken TEXT,
    taken_offset TEXT,
    taken_source TEXT,
    make TEXT,
    model TEXT,
    camera TEXT,
    latitude REAL,
    longitude REAL,
    width INTEGER,
    height INTEGER,
    orientation INTEGER,
    phash TEXT
);
CREATE INDEX IF NOT EXISTS photos_taken ON photos (taken);
CREATE INDEX IF NOT EXISTS photos_camera ON photos (camera);
CREATE INDEX IF NOT EXISTS photos_folder ON photos (folder);
CREATE INDEX IF NOT EXISTS photos_sha1 ON photos (sha1);
CREATE TABLE IF NOT EXISTS unreadable (path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead (row INTEGER PRIMARY KEY);
"""

DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?)?)?")
NEAR = re.compile(r"\s*([-+]?[\d.]+)\s*,\s*([-+]?[\d.]+)\s*,\s*([\d.]+)\s*(km|m)?\s*")


@dataclass(frozen=True)
class Filters:
    """What a search is restricted to; None: no restriction. Build it with `parse_filters`, which checks it."""

    after: str | None = None  # taken at or after (local "YYYY-MM-DDTHH:MM:SS")
    before: str | None = None  # taken before
    camera: str | None = None  # a part of "make model", any case
    folder: str | None = None  # a folder under the photo root ("trips" holds trips/ and everything under it)
    near: tuple[float, float, float] | None = None  # latitude, longitude (degrees), radius (km)

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.after, self.before, self.camera, self.folder, self.near))

    def where(self) -> tuple[str, list]:
        """One SQL condition over `photos` and its parameters ("1" when nothing is filtered). `near` is a box here;
        `Catalogue.select_ids` keeps the rows inside the circle."""
        clauses, params = [], []
        if self.after is not None:
            clauses.append("taken >= ?")
            params.append(self.after)
        if self.before is not None:
            clauses.append("taken < ?")
            params.append(self.before)
        if self.camera is not None:
            clauses.append("instr(camera, ?) > 0")
            params.append(self.camera.lower())
        if self.folder is not None:
            clauses.append("(folder = ? OR substr(folder, 1, ?) = ?)")
            params += [self.folder, len(self.folder) + 1, self.folder + "/"]
        if self.near is not None:
            lat, lon, radius = self.near
            dlat = math.degrees(radius / EARTH_RADIUS_KM)
            clauses.append("latitude BETWEEN ? AND ?")
            params += [lat - dlat, lat + dlat]
            cos_lat = math.cos(math.radians(min(89.9, abs(lat) + dlat)))
            dlon = math.degrees(radius / (EARTH_RADIUS_KM * cos_lat))
            if dlon < 180:  # else every longitude is within reach of the box
                low, high = lon - dlon, lon + dlon
                if low < -180 or high > 180:  # the box crosses the antimeridian: two ranges
                    clauses.append("(longitude >= ? OR longitude <= ?)")
                    params += [(low + 360) if low < -180 else low, (high - 360) if high > 180 else high]
                else:
                    clauses.append("longitude BETWEEN ? AND ?")
                    params += [low, high]
            else:
                clauses.append("longitude IS NOT NULL")
        return (" AND ".join(clauses) or "1"), params


def parse_filters(after: str | None = None, before: str | None = None, camera: str | None = None,
                  folder: str | None = None, near: str | None = None) -> Filters:
    """Filters from their text (flags or query parameters); a bad one is a ClipsnailError naming it."""
    return Filters(after=parse_date(after, "after"), before=parse_date(before, "before"),
                   camera=_nonempty(camera, "camera"), folder=parse_folder(folder), near=parse_near(near))


def parse_date(text: str | None, name: str) -> str | None:
    """"2019", "2019-06", "2019-06-15" or "2019-06-15T14:30[:00]" -> the start of that period,
    "2019-06-01T00:00:00"; ClipsnailError for anything else, or a date that is not in the calendar."""
    if text is None:
        return None
    match = DATE.fullmatch(text.strip())
    if not match:
        raise ClipsnailError(f"--{name} {text!r}: expected a date such as 2019, 2019-06, 2019-06-15 or "
                             f"2019-06-15T14:30")
    year, month, day, hour, minute, second = (int(g) if g else None for g in match.groups())
    try:
        moment = _dt.datetime(year, month or 1, day or 1, hour or 0, minute or 0, second or 0)
    except ValueError as e:
        raise ClipsnailError(f"--{name} {text!r}: not a date ({e})") from None
    return moment.isoformat()


def parse_folder(text: str | None) -> str | None:
    """A folder under the photo root as the catalogue stores it: "a/b", no leading "./", no trailing "/"; one that
    climbs out of the root ("..") is refused."""
    if text is None:
        return None
    parts = [p for p in text.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\0" in text:
        raise ClipsnailError(f"--folder {text!r}: expected a folder under the photo folder, e.g. trips/2019")
    return "/".join(parts)


def parse_near(text: str | None) -> tuple[float, float, float] | None:
    """"LAT,LON,RADIUS" with the radius in km (default) or m ("48.85,2.35,10km", "48.85,2.35,500m") -> (lat, lon,
    km); ClipsnailError for a coordinate off the globe or a radius that is not a positive number."""
    if text is None:
        return None
    match = NEAR.fullmatch(text)
    try:
        lat, lon, radius = (float(match[i]) for i in (1, 2, 3)) if match else (math.nan,) * 3
    except ValueError:
        lat = lon = radius = math.nan
    if not (match and -90 <= lat <= 90 and -180 <= lon <= 180 and 0 < radius < math.inf):
        raise ClipsnailError(f"--near {text!r}: expected LATITUDE,LONGITUDE,RADIUS with latitude in [-90, 90], "
                             f"longitude in [-180, 180] and a positive radius in km or m, e.g. 48.85,2.35,10km")
    return lat, lon, radius / 1000 if match[4] == "m" else radius


def _nonempty(text: str | None, name: str) -> str | None:
    if text is None:
        return None
    if not text.strip():
        raise ClipsnailError(f"--{name}: empty")
    return text.strip()


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine) on the mean Earth sphere."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def folder_of(rel_path: str) -> str:
    return rel_path.rpartition("/")[0]


def as_text(name: str) -> str:
    """A file system name as SQLite text, which must be UTF-8: the bytes of a name that is not UTF-8 are replaced
    (U+FFFD). The path column keeps the exact bytes; this is for folders, which filters match as typed."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def camera_of(make: str | None, model: str | None) -> str | None:
    """"make model" in lower case, the make once ("Canon" + "Canon EOS R5" -> "canon eos r5"), for matching."""
    make, model = (make or "").strip(), (model or "").strip()
    if model.lower().startswith(make.lower()):
        make = ""
    joined = f"{make} {model}".strip().lower()
    return joined or None


class Catalogue:
    """The SQLite catalogue file of an index. `create` makes a new one (WAL mode, the schema, its version);
    `open` reads an existing one and refuses a newer schema than this code knows.

    Besides the photos it holds the state of the index (`state`, a JSON object: how many vector rows are
    committed, the search structure, the run that made the vectors...), the files that could not be read, and the
    dead vector rows, so that one transaction commits a change to all of them."""

    def __init__(self, path: Path, connection: sqlite3.Connection, version: int = SCHEMA_VERSION):
        self.path, self.db, self.version = path, connection, version

    @classmethod
    def create(cls, path: str | Path) -> Catalogue:
        path = Path(path)
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.execute("INSERT OR REPLACE INTO catalogue_info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return cls(path, db)

    @classmethod
    def open(cls, path: str | Path, readonly: bool = True) -> Catalogue:
        path = Path(path)
        if not path.is_file():
            raise ClipsnailError(f"{path}: no catalogue")
        # Read-only: a WAL database in a folder this process cannot write (a read-only mount) opens as immutable.
        modes = ["mode=ro", "mode=ro&immutable=1"] if readonly else ["mode=rw"]
        for i, mode in enumerate(modes):
            try:
                # The web app searches from its worker threads: SQLite itself serialises the use of one connection.
                db = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, isolation_level=None,
                                     check_same_thread=False)
                row = db.execute("SELECT value FROM catalogue_info WHERE key = 'schema_version'").fetchone()
                break
            except sqlite3.OperationalError as e:
                if i + 1 == len(modes):
                    raise ClipsnailError(f"{path}: cannot read the catalogue ({e})") from None
            except sqlite3.DatabaseError as e:
                raise ClipsnailError(f"{path}: not a catalogue this program can read ({e})") from None
        version = int(row[0]) if row and str(row[0]).isdigit() else None
        if version is None or version > SCHEMA_VERSION:
            db.close()
            raise ClipsnailError(f"{path}: catalogue schema version {row[0] if row else None!r} is not one this "
                                 f"clipsnail reads (up to {SCHEMA_VERSION}); upgrade clipsnail")
        if not readonly:
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns: it is the commit point
        return cls(path, db, version)

    def close(self) -> None:
        self.db.close()

    def snapshot(self) -> None:
        """Read one committed state from now until `close`, whatever writers commit meanwhile (WAL): the rows a
        loaded index maps and the photos that name them stay consistent."""
        self.db.execute("BEGIN")
        self.db.execute("SELECT count(*) FROM catalogue_info").fetchone()

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM photos").fetchone()[0]

    def state(self) -> dict | None:
        """The index state committed with the photos (None in a catalogue of the first schema, which had none)."""
        row = self.db.execute("SELECT value FROM catalogue_info WHERE key = 'index'").fetchone()
        try:
            state = json.loads(row[0]) if row else None
        except (TypeError, json.JSONDecodeError):
            state = None
        if row and not isinstance(state, dict):
            raise ClipsnailError(f"{self.path}: damaged: the index state is not a JSON object")
        return state

    def set_state(self, state: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO catalogue_info VALUES ('index', ?)", (json.dumps(state),))

    def insert(self, rows: Iterable[tuple[int | None, int, str, int, int, str, PhotoFacts]]) -> None:
        """Insert photos: (id or None for a new one, vector row, relative path, size, mtime_ns, sha1, facts)."""
        self._write("INSERT", rows)

    def replace(self, rows: Iterable[tuple[int, int, str, int, int, str, PhotoFacts]]) -> None:
        """Rewrite the photos of these ids (same tuples as `insert`): a changed, moved or touched file."""
        self._write("REPLACE", rows)

    def _write(self, verb: str, rows: Iterable[tuple]) -> None:
        self.db.executemany(f"{verb} INTO photos ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            (_values(*row) for row in rows))

    def delete(self, ids: Iterable[int]) -> None:
        self.db.executemany("DELETE FROM photos WHERE id = ?", ((i,) for i in ids))

    def add_dead(self, rows: Iterable[int]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO dead VALUES (?)", ((int(r),) for r in rows))

    def dead_rows(self) -> np.ndarray:
        return np.fromiter((r for (r,) in self.db.execute("SELECT row FROM dead")), dtype=np.int64)

    def set_unreadable(self, unreadable: dict[str, tuple[int, int]]) -> None:
        """The files that could not be read, {relative path: (size, mtime_ns)}: tried again only when they change."""
        self.db.execute("DELETE FROM unreadable")
        self.db.executemany("INSERT INTO unreadable VALUES (?, ?, ?)",
                            ((os.fsencode(r), s, m) for r, (s, m) in sorted(unreadable.items())))

    def unreadable(self) -> dict[str, tuple[int, int]]:
        return {os.fsdecode(p): (s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM unreadable")}

    def files(self) -> Iterator[tuple[str, int, int, int, int, str]]:
        """Every photo as (relative path, size, mtime_ns, id, row, sha1), streamed: a library of a million photos
        is compared with its folder without holding the catalogue in memory."""
        for path, size, mtime_ns, i, row, sha1 in self.db.execute(
                "SELECT path, size, mtime_ns, id, row, sha1 FROM photos"):
            yield os.fsdecode(path), size, mtime_ns, i, row, sha1

    def rows_with_sha1(self, sha1: str) -> list[tuple[int, int]]:
        """(id, row) of the photos holding these bytes."""
        return self.db.execute("SELECT id, row FROM photos WHERE sha1 = ?", (sha1,)).fetchall()

    def transaction(self):
        return _Transaction(self.db)

    def copy_from(self, other: Path, moved_rows: Iterable[tuple[int, int]], state: dict) -> None:
        """Fill this new catalogue with every photo and unreadable file of the catalogue at `other`, each photo at
        its new vector row (`moved_rows`: (old row, new row) pairs; a photo whose row is not there is dropped),
        and `state`: a compaction's new catalogue, ids kept."""
        self.db.execute("ATTACH DATABASE ? AS old", (str(other),))
        try:
            with self.transaction():
                self.db.execute("CREATE TEMP TABLE new_rows (old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
                self.db.executemany("INSERT INTO new_rows VALUES (?, ?)", ((int(a), int(b)) for a, b in moved_rows))
                rest = ", ".join(c for c in COLUMNS if c not in ("id", "row"))
                self.db.execute(f"INSERT INTO photos (id, row, {rest}) SELECT id, new_rows.new, {rest} FROM old.photos "
                                f"JOIN new_rows ON new_rows.old = old.photos.row")
                self.db.execute("INSERT INTO unreadable SELECT * FROM old.unreadable")
                # Ids are never given twice, not even those of photos deleted before the copy
                self.db.execute("INSERT OR REPLACE INTO sqlite_sequence SELECT * FROM old.sqlite_sequence")
                self.db.execute("DROP TABLE new_rows")
                self.set_state(state)
        finally:
            self.db.execute("DETACH DATABASE old")

    def select_rows(self, filters: Filters) -> np.ndarray:
        """The vector rows of the photos that pass `filters`, ascending."""
        where, params = filters.where()
        if filters.near is None:
            cursor = self.db.execute(f"SELECT row FROM photos WHERE {where} ORDER BY row", params)
            return np.fromiter((r for (r,) in cursor), dtype=np.int64)
        lat, lon, radius = filters.near
        rows = self.db.execute(f"SELECT row, latitude, longitude FROM photos WHERE {where} ORDER BY row", params)
        return np.fromiter((r for r, la, lo in rows if distance_km(lat, lon, la, lo) <= radius), dtype=np.int64)

    def photos_at(self, rows: Sequence[int]) -> dict[int, tuple[int, str]]:
        """{vector row: (photo id, relative path)} of the photos holding these rows."""
        return {r: (i, p) for r, i, p in self._chunked("SELECT row, id, path FROM photos WHERE row IN ({})", rows)}

    def photos(self, ids: Sequence[int]) -> dict[int, tuple[int, str]]:
        """{photo id: (vector row, relative path)} of these ids (those that exist)."""
        return {i: (r, p) for i, r, p in self._chunked("SELECT id, row, path FROM photos WHERE id IN ({})", ids)}

    def id_of(self, rel: str) -> int | None:
        row = self.db.execute("SELECT id FROM photos WHERE path = ?", (os.fsencode(rel),)).fetchone()
        return row[0] if row else None

    def _chunked(self, sql: str, keys: Sequence[int]) -> Iterator[tuple[int, int, str]]:
        keys = [int(k) for k in keys]
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start:start + 500]
            for a, b, path in self.db.execute(sql.format(", ".join("?" * len(chunk))), chunk):
                yield a, b, os.fsdecode(path)

    def summary(self) -> dict:
        """What `index info` shows: the count, the range of dates taken (and how many came from EXIF), the cameras
        by number of photos, how many photos have a position."""
        count, first, last, from_exif, placed = self.db.execute(
            "SELECT count(*), min(taken), max(taken), sum(taken_source != 'file'), sum(latitude IS NOT NULL) "
            "FROM photos").fetchone()
        cameras = self.db.execute("SELECT camera, count(*) FROM photos WHERE camera IS NOT NULL GROUP BY camera "
                                  "ORDER BY count(*) DESC, camera").fetchall()
        return {"photos": count, "taken": {"first": first, "last": last, "from_exif": from_exif or 0},
                "cameras": [{"camera": c, "photos": n} for c, n in cameras], "with_position": placed or 0}


def _values(i, row, rel, size, mtime_ns, sha1, f: PhotoFacts) -> tuple:
    # The path as its bytes (a name need not be UTF-8, SQLite text must be), exactly as the file system has it
    return (i, row, os.fsencode(rel), as_text(folder_of(rel)), size, mtime_ns, sha1, f.taken, f.taken_offset,
            f.taken_source, f.make, f.model, camera_of(f.make, f.model), f.latitude, f.longitude, f.width, f.height,
            f.orientation, f.phash)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception: the commit is the moment the new state exists."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


# ----------------------------------------------------------------------------------------------- with an index


def read_all_facts(root: Path, rels: Sequence[str], follow_links: bool, known: dict | None = None,
                   progress: bool = False) -> dict[str, PhotoFacts]:
    """{relative path: facts} of `rels` under `root`; those in `known` (facts kept from an older catalogue, for
    files that did not change) are not read again. A file that cannot be opened gets empty facts."""
    from tqdm import tqdm

    known = known or {}
    out = {}
    for rel in tqdm(rels, desc="read photo facts", unit="photo", disable=not progress or len(rels) < 1000):
        if rel in known:
            out[rel] = known[rel]
            continue
        try:
            out[rel] = read_photo_facts(root / rel, root, follow_links)
        except (OSError, DataError):
            out[rel] = PhotoFacts()
    return out


def facts_by_path(catalogue: Catalogue) -> dict[str, PhotoFacts]:
    """{relative path: facts} of every photo in the catalogue (what an upgrade from index format 1 keeps)."""
    names = ("taken", "taken_offset", "taken_source", "make", "model", "latitude", "longitude", "width", "height",
             "orientation", "phash")
    rows = catalogue.db.execute(f"SELECT path, {', '.join(names)} FROM photos")
    return {os.fsdecode(row[0]): PhotoFacts(**dict(zip(names, row[1:]))) for row in rows}
