"""Duplicate and near-duplicate texts, within one set and between sets (leakage), without an N x N matrix.

Two signals, both on :func:`normalise`'d text (Unicode NFKC, case folded, punctuation dropped, whitespace collapsed):

* ``exact``: texts equal after normalisation (a hash table; case, whitespace and punctuation changes are found here).
* ``near``: the Jaccard similarity of the texts' character ``ngram`` sets (5-grams by default) is at least
  ``threshold``. Candidates come from MinHash locality-sensitive hashing (``bands`` x ``rows`` hash values per text,
  a pair is a candidate when all ``rows`` values of one band agree), and every candidate's similarity is then
  computed exactly on the two n-gram sets (after dropping candidates whose estimate from the hash values is more than
  0.1 below ``threshold``), so a reported similarity is never an estimate. With the defaults a pair at similarity
  0.4 becomes a candidate with probability 1 - (1 - 0.4^4)^128 = 0.964, at 0.5 with 0.9997, at 0.1 with 0.013.

``benchmarks/duplicates.py`` measured the defaults on Rotten Tomatoes with planted duplicates.

Cost for N texts of L characters on average, with P = ``bands * rows`` hash values: hashing O(N L P) time (in
blocks of 32k n-grams), banding O(N P log N), and O(C P + C' L) for the C candidate pairs (C' left after the
estimate). C is the number of similar pairs plus chance collisions, about 0.013 of the pairs at similarity 0.1 (so
C grows like N^2 only on text that is all alike); ``benchmarks/duplicates.py`` measured the time's growth in N.
Memory O(N P + N L + C).

Example:
    >>> pairs = find_duplicates(train["text"], other={"test": test["text"]})
    >>> pairs[0]     # {'index': 12, 'split': 'train', 'other_index': 40, 'other_split': 'test', 'similarity': 1.0,
    ...              #  'match': 'exact', ...}
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .errors import TurnoverError

DEFAULT_NGRAM = 5
DEFAULT_THRESHOLD = 0.4
DEFAULT_BANDS = 128
DEFAULT_ROWS = 4
_PREFILTER_MARGIN = 0.1  # 4.6 standard errors of a 512-value estimate at similarity 0.4
_MODULUS = np.uint64((1 << 31) - 1)
_BASES = (np.uint64(1_000_003), np.uint64(999_983))
_BLOCK_NGRAMS = 1 << 15
_PUNCTUATION = re.compile(r"[^\w\s]|_", re.UNICODE)


def normalise(text: str) -> str:
    """``text`` as compared for duplicates: NFKC, case folded, punctuation removed, whitespace collapsed (a text of
    nothing but punctuation and symbols keeps them).

    Example:
        >>> normalise("  A  Gripping, beautifully-shot FILM! ")
        'a gripping beautifully shot film'
    """
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    # a text of punctuation or symbols only (emoji, "?!") keeps them: it is not the empty text
    return " ".join(_PUNCTUATION.sub(" ", text).split()) or " ".join(text.split())


@dataclass
class DuplicateOptions:
    """How :func:`find_duplicates` compares texts (see the module docstring for what each value costs).

    Example:
        >>> strict = DuplicateOptions(threshold=0.6)          # fewer near duplicates, each more alike
        >>> find_duplicates(train["text"], {"test": test["text"]}, options=strict)
    """

    ngram: int = DEFAULT_NGRAM
    threshold: float = DEFAULT_THRESHOLD
    bands: int = DEFAULT_BANDS
    rows: int = DEFAULT_ROWS
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ngram", "bands", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TurnoverError(f"duplicate option {name} must be a positive integer, got {value!r}.")
        if not 0 < float(self.threshold) <= 1:
            raise TurnoverError(
                f"duplicate threshold must be in (0, 1] (a Jaccard similarity), got {self.threshold!r}.")


def _shingle_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every text's distinct character n-gram hashes (62 bits: two polynomial hashes mod 2^31 - 1), concatenated, and
    the start of each text. The text is padded with one space on each side, so a text shorter than ``n`` is one
    n-gram of itself."""
    pieces, starts, total = [], [0], 0
    for text in texts:
        codes = np.frombuffer(f" {text} ".encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        if len(codes) < n:
            codes = np.concatenate([codes, np.zeros(n - len(codes), dtype=np.uint64)])
        windows = np.lib.stride_tricks.sliding_window_view(codes, n)
        high = np.zeros(len(windows), dtype=np.uint64)
        low = np.zeros(len(windows), dtype=np.uint64)
        for j in range(n):  # products stay below 2^62: exact in uint64
            high = (high * _BASES[0] + windows[:, j]) % _MODULUS
            low = (low * _BASES[1] + windows[:, j]) % _MODULUS
        unique = np.unique((high << np.uint64(31)) | low)
        pieces.append(unique)
        total += len(unique)
        starts.append(total)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)), np.asarray(starts, dtype=np.int64)


def _minhash(hashes: np.ndarray, starts: np.ndarray, permutations: int, seed: int) -> np.ndarray:
    """``(N, permutations)`` MinHash signatures: for each of ``permutations`` random permutations of the 32-bit
    integers (x -> a x + b mod 2^32, a odd), the minimum over a text's n-gram hashes. Texts are taken in blocks of
    about ``_BLOCK_NGRAMS`` n-grams, so memory stays O(_BLOCK_NGRAMS * permutations)."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 1 << 32, size=permutations, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
    b = rng.integers(0, 1 << 32, size=permutations, dtype=np.uint64).astype(np.uint32)
    folded = (hashes ^ (hashes >> np.uint64(31))).astype(np.uint32)  # 62 bits folded into 32
    n = len(starts) - 1
    signatures = np.empty((n, permutations), dtype=np.uint32)
    first = 0
    while first < n:
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + _BLOCK_NGRAMS, side="right")) - 1)
        last = min(last, n)
        part = folded[starts[first]:starts[last]]
        with np.errstate(over="ignore"):  # (P, S): the minimum over a text's n-grams runs along memory
            values = a[:, None] * part[None, :]
            values += b[:, None]
        signatures[first:last] = np.minimum.reduceat(values, starts[first:last] - starts[first], axis=1).T
        first = last
    return signatures


def _candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(C, 2)`` index pairs ``i < j`` that agree on all ``rows`` values of at least one band."""
    n = len(signatures)
    found = []
    for band in range(bands):
        chunk = signatures[:, band * rows:(band + 1) * rows].astype(np.uint64)
        key = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for column in range(rows):
                key = key * np.uint64(0x9E3779B97F4A7C15) + chunk[:, column]
        order = np.argsort(key, kind="stable")
        sorted_keys = key[order]
        starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
        lengths = np.diff(np.append(starts, n))
        pairs_of_two = starts[lengths == 2]
        if len(pairs_of_two):
            low = np.minimum(order[pairs_of_two], order[pairs_of_two + 1])
            high = np.maximum(order[pairs_of_two], order[pairs_of_two + 1])
            found.append(low * np.int64(n) + high)
        for start, length in zip(starts[lengths > 2].tolist(), lengths[lengths > 2].tolist()):
            run = np.sort(order[start:start + length])
            i, j = np.triu_indices(length, k=1)
            found.append(run[i] * np.int64(n) + run[j])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1)


def _jaccard(hashes: np.ndarray, starts: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the n-gram sets of each pair."""
    out = np.empty(len(pairs), dtype=np.float64)
    for k, (i, j) in enumerate(pairs.tolist()):
        a, b = hashes[starts[i]:starts[i + 1]], hashes[starts[j]:starts[j + 1]]
        common = len(np.intersect1d(a, b, assume_unique=True))
        out[k] = common / (len(a) + len(b) - common)
    return out


def _linked(first: list[int], second: list[int], owner: list[tuple[int, int]],
            all_pairs: int = 64) -> list[tuple[int, int]]:
    """The pairs that report two near-duplicate groups: all of them while there are at most ``all_pairs``, else each
    member of one group with the other group's first main-set member (or first member), so every member is named."""
    if len(first) * len(second) <= all_pairs:
        return [(i, j) for i in first for j in second]

    def anchor(group: list[int]) -> int:
        return next((k for k in group if owner[k][0] == 0), group[0])

    return [(i, anchor(second)) for i in first] + [(anchor(first), j) for j in second]


def find_duplicates(
    texts: Sequence[str],
    other: Optional[Mapping[str, Sequence[str]]] = None,
    *,
    split: str = "train",
    options: Optional[DuplicateOptions] = None,
    near: bool = True,
) -> list[dict]:
    """Duplicate pairs within ``texts`` and between ``texts`` and each set of ``other`` (name -> texts).

    Returns one dict per pair, most similar first: ``index`` (a position in ``texts``), ``split`` (``split``),
    ``other_index`` (a position in ``texts`` for a pair within them, else in ``other[other_split]``),
    ``other_split``, ``similarity`` (1.0 for an exact duplicate, else the Jaccard similarity of the character n-gram
    sets), ``match`` (``"identical"``: the same text; ``"normalised"``: the same after :func:`normalise`; ``"near"``)
    and ``source`` (which signal found it). Within ``texts`` a pair names the later position as ``index``. A group of
    k texts that are the same after normalisation gives k - 1 pairs (each copy with the group's first member of
    ``texts``) plus one per other member of ``texts`` and other set (with that set's first copy). Two groups that
    are near duplicates are reported pair by pair while that makes at most 64 pairs, else by linking each member of
    one with the other's first member of ``texts``. Pairs within ``other`` are not reported.

    Example:
        >>> find_duplicates(["A film.", "a film", "another"])[0]["match"]
        'normalised'
    """
    options = options or DuplicateOptions()
    sets: list[tuple[str, Sequence[str]]] = [(split, list(texts))]
    for name, values in (other or {}).items():
        if name == split:
            raise TurnoverError(f"the other set is named {name!r} like the main set; give it another name.")
        sets.append((name, list(values)))
    raw: list[str] = []
    owner: list[tuple[int, int]] = []  # (set number, position in it)
    for s, (_, values) in enumerate(sets):
        for position, value in enumerate(values):
            if not isinstance(value, str):
                raise TurnoverError(
                    f"duplicates compare text, but row {position} of {sets[s][0]!r} is a {type(value).__name__}."
                )
            raw.append(value)
            owner.append((s, position))
    normalised = [normalise(t) for t in raw]
    pairs: dict[tuple[int, int], dict] = {}

    def add(i: int, j: int, similarity: float, match: str, source: str) -> None:
        (si, pi), (sj, pj) = owner[i], owner[j]
        if si != 0 and sj != 0:
            return  # both in other sets: not the training set's problem
        if si != 0 or (sj == 0 and pi < pj):
            i, j, (si, pi), (sj, pj) = j, i, (sj, pj), (si, pi)
        key = (i, j)
        if key in pairs:
            return
        pairs[key] = {"index": pi, "split": sets[0][0], "other_index": pj, "other_split": sets[sj][0],
                      "similarity": float(similarity), "match": match, "source": source}

    # exact: group by the normalised text. Each copy pairs with the group's first main-set member (k - 1 pairs for k
    # copies, not k^2), and each other main-set member with the first copy in each other set: every copy in another
    # set and every main-set member with a copy elsewhere appears in at least one pair
    groups: dict[str, list[int]] = {}
    for k, key in enumerate(normalised):
        groups.setdefault(key, []).append(k)

    def star(members: list[int], link: Callable[[int, int], None]) -> None:
        main = [k for k in members if owner[k][0] == 0]
        if not main:
            return
        firsts: dict[int, int] = {}
        for k in members:
            if k != main[0]:
                link(main[0], k)
            if owner[k][0] != 0:
                firsts.setdefault(owner[k][0], k)
        for m in main[1:]:
            for k in firsts.values():
                link(m, k)

    exact = "exact: normalised text"
    for members in groups.values():
        star(members, lambda i, j: add(i, j, 1.0, "identical" if raw[i] == raw[j] else "normalised", exact))
    if near and len(groups) > 1:
        # near duplicates among the distinct normalised texts; a match extends to both groups' representatives
        members_of = list(groups.values())
        hashes, starts = _shingle_hashes([normalised[m[0]] for m in members_of], options.ngram)
        signatures = _minhash(hashes, starts, options.bands * options.rows, options.seed)
        candidates = _candidate_pairs(signatures, options.bands, options.rows)
        if len(candidates):
            estimate = np.concatenate([
                (signatures[candidates[k:k + 65536, 0]] == signatures[candidates[k:k + 65536, 1]]).mean(1)
                for k in range(0, len(candidates), 65536)])
            candidates = candidates[estimate >= options.threshold - _PREFILTER_MARGIN]
            similarity = _jaccard(hashes, starts, candidates)
            keep = similarity >= options.threshold
            source = f"near: MinHash LSH, exact Jaccard of character {options.ngram}-grams >= {options.threshold:g}"
            for (a, b), value in zip(candidates[keep].tolist(), similarity[keep].tolist()):
                for i, j in _linked(members_of[a], members_of[b], owner):
                    add(i, j, value, "near", source)
    return sorted(pairs.values(), key=lambda p: (-p["similarity"], p["other_split"], p["index"], p["other_index"]))
