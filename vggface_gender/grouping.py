"""Which images must stay in one split: near-duplicate photos and user-given groups.

**Near-duplicates** (``data.dedup: near``). Every candidate gets a perceptual hash from
``imagehash`` (pHash, 16x16 = 256 bits: the signs of the lowest DCT frequencies of the grey image
at 64x64), of the photo and of its mirror image. Two photos are near-duplicates when
``min(d(a, b), d(a, mirror(b))) <= data.near_threshold`` (Hamming distance). That catches the same
photo re-encoded, resized, mirrored or slightly brightened; it does not catch crops (a 10% crop
moves a face crop's pHash as far as another person's). JPEGs are decoded at a reduced DCT scale
(Pillow's ``draft``, never below 64 px a side) by the project's one loader.

Pairs are linked with a union-find whose groups never grow past ``MAX_NEAR_GROUP`` images: a link
that would make a larger group is refused (and counted), so a loose threshold cannot chain
hundreds of photos into one group. Pairs are found by comparing every hash with every later one,
a block of rows at a time (memory stays flat; time grows with the square of the number of
distinct hashes: 1.2 s for the 18 million pairs of 6000 photos on one core); identical hashes
are linked first.

**Groups** (``data.groups``): a regular expression with at least one named group, searched in
each image's path below its class folder (``alice/001.jpg``; the named groups' text is the group
id), or a CSV file with ``path`` (as in the manifests, or absolute) and ``group`` columns. Images
the rule does not cover are groups of their own (counted in ``summary.json``).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from . import images
from .errors import ConfigError, ImageError

HASH_SIZE = 16                      # pHash of 16 x 16 = 256 bits
HASH_BYTES = HASH_SIZE * HASH_SIZE // 8
HASH_DECODE = images.ImagePolicy((4 * HASH_SIZE, 4 * HASH_SIZE), "crop")  # draft: >= 64 px a side
MAX_NEAR_GROUP = 16                 # largest near-duplicate group a link may make
MAX_LISTED = 10_000                 # pairs kept for summary.json (all are counted)
METHOD = f"imagehash.phash(hash_size={HASH_SIZE}) of the image and of its mirror; Hamming distance"


# --------------------------------------------------------------------------- hashing
def perceptual_hash(path) -> bytes | str:
    """``2 * HASH_BYTES`` bytes (pHash of the image, then of its mirror), or why it cannot be decoded."""
    import imagehash  # only for data.dedup: near (it imports scipy)
    from PIL import Image

    try:
        grey = images.open_grey(path, HASH_DECODE)
    except ImageError as exc:
        text, prefix = str(exc), f"{path}: "
        return text[len(prefix):] if text.startswith(prefix) else text
    plain = imagehash.phash(grey, hash_size=HASH_SIZE).hash
    mirror = imagehash.phash(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hash_size=HASH_SIZE).hash
    return np.packbits(plain).tobytes() + np.packbits(mirror).tobytes()


def near_pairs(hashes: np.ndarray, threshold: int, block_elements: int = 1 << 21):
    """Yield ``(i, j, distance)`` arrays, ``i < j``, for every pair within ``threshold``.

    ``hashes``: ``(n, 2 * HASH_BYTES)`` uint8 rows (plain hash, mirror hash). Distance is
    ``min(d(plain_i, plain_j), d(plain_i, mirror_j))``. Rows come in ascending ``i``; within a
    row, by distance, then ``j``. Memory: one block of about ``block_elements`` words.
    """
    n = hashes.shape[0]
    words = np.ascontiguousarray(hashes).view(np.uint64)  # (n, 8): 4 words plain, 4 mirror
    plain, mirror = words[:, :4], words[:, 4:]
    start = 0
    while start < n - 1:
        rows = max(1, min(n - 1 - start, block_elements // (4 * (n - start))))
        stop = start + rows
        a = plain[start:stop, None, :]
        cols = slice(start + 1, n)
        d = _bits_set(a ^ plain[None, cols])
        np.minimum(d, _bits_set(a ^ mirror[None, cols]), out=d)
        r, c = np.nonzero(d <= threshold)
        i, j = r + start, c + start + 1
        keep = j > i
        i, j, dist = i[keep], j[keep], d[r[keep], c[keep]]
        if i.size:
            order = np.lexsort((j, dist, i))
            yield i[order], j[order], dist[order]
        start = stop


_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def _bits_set(x: np.ndarray) -> np.ndarray:
    """Set bits of each row of uint64 words along the last axis (uint16)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).sum(-1, dtype=np.uint16)
    x = np.ascontiguousarray(x)
    return _POPCOUNT8[x.view(np.uint8)].sum(-1, dtype=np.uint16)


class UnionFind:
    """Union-find over ``n`` items, with an optional cap on the size of a set."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, a: int, b: int, cap: int | None = None) -> bool:
        """Join the sets of ``a`` and ``b``; False (nothing done) if that would exceed ``cap``."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if cap is not None and self.size[ra] + self.size[rb] > cap:
            return False
        if ra > rb:  # the smaller index is the root: results do not depend on union order
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(self.parent.size)], dtype=np.int64)


def link_near(hashes: np.ndarray, threshold: int, cap: int = MAX_NEAR_GROUP):
    """Union-find of the near-duplicate links; ``(uf, pairs, refused, [n_pairs, n_refused])``.

    ``pairs``: ``(i, j, distance)`` of the pairs found (linked or not); ``refused``: the pairs
    not linked because the group would have grown past ``cap``. Each list keeps its first
    ``MAX_LISTED`` entries (memory stays bounded whatever the threshold); the counts are complete.
    """
    n = hashes.shape[0]
    uf = UnionFind(n)
    pairs: list[tuple[int, int, int]] = []
    refused: list[tuple[int, int, int]] = []

    counts = [0, 0]  # pairs found, links refused (the lists keep the first MAX_LISTED of each)

    def link(a: int, b: int, d: int) -> None:
        counts[0] += 1
        if len(pairs) < MAX_LISTED:
            pairs.append((a, b, d))
        if not uf.union(a, b, cap):
            counts[1] += 1
            if len(refused) < MAX_LISTED:
                refused.append((a, b, d))

    if n == 0:
        return uf, pairs, refused, counts
    # Identical hashes first (a photo re-saved often hashes the same): each is linked to the first
    # row with that hash, and only the distinct hashes are compared pairwise.
    rows = np.ascontiguousarray(hashes).view(np.dtype((np.void, hashes.shape[1]))).ravel()
    order = np.argsort(rows, kind="stable")
    same = np.r_[False, rows[order][1:] == rows[order][:-1]]
    first = np.maximum.accumulate(np.where(~same, np.arange(n), 0))  # run start, in sorted order
    leaders = order[~same]  # the first (smallest) index of each distinct hash
    for k in np.flatnonzero(same).tolist():
        link(int(order[first[k]]), int(order[k]), 0)
    leaders.sort()
    for i, j, dist in near_pairs(hashes[leaders], threshold):
        for a, b, d in zip(leaders[i].tolist(), leaders[j].tolist(), dist.tolist()):
            link(a, b, d)
    return uf, pairs, refused, counts


# --------------------------------------------------------------------------- data.groups
class GroupRule:
    """``data.groups``: maps an image's path (relative to data.root) to a group id or None."""

    def __init__(self, describe: str, pattern: re.Pattern | None = None, table: dict | None = None,
                 root: Path | None = None):
        self.describe = describe
        self.pattern = pattern
        self.table = table
        self.root = root

    def group_of(self, rel: str, class_folder: str) -> str | None:
        if self.pattern is not None:
            below = rel[len(class_folder) + 1:] if rel.startswith(class_folder + "/") else rel
            m = self.pattern.search(below)
            if m is None:
                return None
            values = [v for v in m.groupdict().values() if v is not None]
            return "\x1f".join(values) if values else None
        key = os.path.normpath(os.path.abspath(self.root / rel))
        return self.table.get(key)


def group_rule(cfg) -> GroupRule | None:
    """The ``data.groups`` rule, or None. A bad regex or CSV is a one-line ``ConfigError``."""
    spec = cfg.data.groups
    if spec is None:
        return None
    where = f"{cfg.source}: data.groups" if getattr(cfg, "source", None) else "data.groups"
    spec = spec.strip()
    if spec.lower().endswith(".csv"):
        return _csv_rule(cfg, spec, where)
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        raise ConfigError(f"{where}: {spec!r} is not a valid regular expression ({exc}) "
                          f"nor a .csv file") from None
    if not pattern.groupindex:
        raise ConfigError(f"{where}: the regular expression {spec!r} has no named group; name the "
                          "group id, e.g. ^(?P<person>[^/]+)/")
    return GroupRule(f"regex {spec}", pattern=pattern)


def _csv_rule(cfg, spec: str, where: str) -> GroupRule:
    candidates = [Path(spec)] if os.path.isabs(spec) else (
        ([Path(cfg.source).parent / spec] if getattr(cfg, "source", None) else []) + [Path.cwd() / spec])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{where}: CSV file {spec} not found "
                          f"(looked in {', '.join(str(p.parent) for p in candidates)})")
    root = Path(cfg.data.root)
    table: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if "path" not in columns or "group" not in columns:
                raise ConfigError(f"{path}: expected a header with 'path' and 'group' columns "
                                  f"(data.groups), got {columns}")
            for row in reader:
                image, group = (row.get("path") or "").strip(), (row.get("group") or "").strip()
                if not image or not group:
                    continue
                p = Path(image)
                table[os.path.normpath(os.path.abspath(p if p.is_absolute() else root / p))] = group
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read the groups CSV ({exc})") from None
    return GroupRule(f"CSV {path}", table=table, root=root)
