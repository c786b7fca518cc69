"""Duplicate photos in an index: exact copies (the same bytes, by sha1) and near copies (the same photo
recompressed, resized or slightly cropped: perceptual hashes a few bits apart).

Near copies are judged by the 64-bit DCT perceptual hash the catalogue keeps of each photo
(`clipsnail.data.photo_facts.perceptual_hash`), not by the search embedding: a semantic embedding puts two photos
of the same kind of thing as close as a photo and its copy (the packaged zero-shot model does; bench/duplicates.py
measures both). Pairs within the Hamming radius are found with a faiss binary index (`IndexBinaryFlat` range
search, in chunks) and joined into groups (a copy of a copy is in its original's group). The default radius is
measured on real photos and their altered copies (BENCHMARKS.md); distinct burst shots of one scene can be as close
as copies, and a larger radius groups more of them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from clipsnail.core.errors import ClipsnailError

DEFAULT_MAX_BITS = 10  # Hamming distance of two 64-bit perceptual hashes up to which photos are near copies
CHUNK = 4096  # hashes searched at once


def _catalogue(index):
    return index.catalogue


def exact_groups(index) -> list[list[int]]:
    """Ids of the photos that share their bytes, a group per sha1 (two or more photos), largest first."""
    rows = _catalogue(index).db.execute(
        "SELECT sha1, group_concat(id) FROM photos GROUP BY sha1 HAVING count(*) > 1 ORDER BY count(*) DESC, sha1")
    return [sorted(int(i) for i in ids.split(",")) for _, ids in rows]


def near_pairs(index, max_bits: int = DEFAULT_MAX_BITS) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) for every pair i < j of catalogued photos whose perceptual hashes differ in at most
    `max_bits` of their 64 bits (photos without a hash, or with the hash of a flat image, are left out)."""
    if not 0 <= max_bits < 64:
        raise ClipsnailError(f"--max-bits {max_bits}: a Hamming distance of 64-bit hashes, 0 to 63")
    import faiss

    rows = _catalogue(index).db.execute(
        "SELECT id, phash FROM photos WHERE phash IS NOT NULL AND phash != '0000000000000000' ORDER BY id").fetchall()
    if len(rows) < 2:
        return []
    ids = np.array([i for i, _ in rows], dtype=np.int64)
    codes = np.array([bytes.fromhex(h) for _, h in rows], dtype="S8").view(np.uint8).reshape(len(rows), 8)
    binary = faiss.IndexBinaryFlat(64)
    binary.add(codes)
    pairs = []
    for start in range(0, len(rows), CHUNK):
        limits, distances, found = binary.range_search(codes[start:start + CHUNK], max_bits + 1)  # radius: < it
        for row in range(len(limits) - 1):
            i = start + row
            for d, j in zip(distances[limits[row]:limits[row + 1]], found[limits[row]:limits[row + 1]]):
                if j > i:
                    pairs.append((int(ids[i]), int(ids[j]), int(d)))
    return pairs


def groups_of(pairs) -> list[list[int]]:
    """The connected groups of `pairs` (union-find over their first two items), each sorted, largest first."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, *_ in pairs:
        parent[root(i)] = root(j)
    members = defaultdict(list)
    for x in parent:
        members[root(x)].append(x)
    return sorted((sorted(m) for m in members.values()), key=lambda m: (-len(m), m[0]))


def find_duplicates(index, max_bits: int = DEFAULT_MAX_BITS) -> dict:
    """{"exact": [[path, ...], ...], "near": [{"paths": [...], "max_bits"}, ...], counts}, paths relative to the
    index root. Near groups leave out pairs that are exact copies: those are listed once, under "exact"."""
    sha1 = dict(_catalogue(index).db.execute("SELECT id, sha1 FROM photos"))
    rel = index.rel_path
    exact = exact_groups(index)
    pairs = [p for p in near_pairs(index, max_bits) if sha1.get(p[0]) != sha1.get(p[1])]
    near = groups_of(pairs)
    group_of = {i: g for g, members in enumerate(near) for i in members}
    widest = defaultdict(int)
    for i, _, d in pairs:
        widest[group_of[i]] = max(widest[group_of[i]], d)
    return {"max_bits": max_bits, "exact_groups": len(exact), "near_groups": len(near),
            "exact": [[rel(i) for i in g] for g in exact],
            "near": [{"paths": [rel(i) for i in g], "max_bits": widest[k]} for k, g in enumerate(near)]}
