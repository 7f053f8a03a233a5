"""Exact and near-duplicate detection for short Chinese texts.

Exact: texts are equal after `text_key` (NFKC, lower case, whitespace and punctuation removed).
Near: two texts whose character shingles have a Jaccard similarity at or above the threshold
count as one. MinHash LSH (datasketch) finds candidates with a deliberately low threshold (so it
misses almost nothing), and the exact Jaccard of the shingle sets decides. Used greedily:
walk the candidates in a seeded order and keep a text only if nothing kept so far is a
duplicate of it, which stops as soon as enough texts are kept.
"""

from __future__ import annotations

import re
import unicodedata

from datasketch import MinHash, MinHashLSH

from lingtune.config import DedupeConfig

_NOT_CONTENT = re.compile(r"[\W_]+", re.UNICODE)


def text_key(text: str) -> str:
    return _NOT_CONTENT.sub("", unicodedata.normalize("NFKC", text).lower())


def shingles(key: str, size: int) -> set[str]:
    if len(key) <= size:
        return {key}
    return {key[i : i + size] for i in range(len(key) - size + 1)}


class NearDuplicateIndex:
    """Keeps the texts accepted so far; `add` refuses a text too close to one of them."""

    def __init__(self, cfg: DedupeConfig, seed: int = 1):
        self.cfg = cfg
        self.seed = seed
        candidate_threshold = max(0.2, cfg.near_duplicate_threshold - 0.3)
        self.lsh = MinHashLSH(threshold=candidate_threshold, num_perm=cfg.num_perm)
        self.keys: set[str] = set()
        self.shingles: dict[str, set[str]] = {}
        self.exact_rejected = 0
        self.near_rejected = 0

    def _minhash(self, grams: set[str]) -> MinHash:
        mh = MinHash(num_perm=self.cfg.num_perm, seed=self.seed)
        mh.update_batch([s.encode("utf-8") for s in grams])
        return mh

    def _is_near(self, grams: set[str], candidate: str) -> bool:
        other = self.shingles[candidate]
        return len(grams & other) / len(grams | other) >= self.cfg.near_duplicate_threshold

    def add(self, text: str) -> bool:
        key = text_key(text)
        if key in self.keys:
            self.exact_rejected += 1
            return False
        grams = shingles(key, self.cfg.shingle_chars)
        mh = self._minhash(grams)
        if any(self._is_near(grams, candidate) for candidate in self.lsh.query(mh)):
            self.near_rejected += 1
            return False
        name = str(len(self.keys))
        self.lsh.insert(name, mh)
        self.shingles[name] = grams
        self.keys.add(key)
        return True

    def stats(self) -> dict:
        return {"kept": len(self.keys), "exact_duplicates": self.exact_rejected,
                "near_duplicates": self.near_rejected}
