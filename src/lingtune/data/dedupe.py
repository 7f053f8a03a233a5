"""Exact and near-duplicate detection for short Chinese texts.

Exact: texts are equal after `text_key` (NFKC, lower case, whitespace and punctuation removed).
Near: MinHash over character shingles of the key, with an LSH index (datasketch), so two
texts whose estimated Jaccard similarity is above the threshold count as one. Used greedily:
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
        self.lsh = MinHashLSH(threshold=cfg.near_duplicate_threshold, num_perm=cfg.num_perm)
        self.keys: set[str] = set()
        self.exact_rejected = 0
        self.near_rejected = 0

    def _minhash(self, key: str) -> MinHash:
        mh = MinHash(num_perm=self.cfg.num_perm, seed=self.seed)
        mh.update_batch([s.encode("utf-8") for s in shingles(key, self.cfg.shingle_chars)])
        return mh

    def add(self, text: str) -> bool:
        key = text_key(text)
        if key in self.keys:
            self.exact_rejected += 1
            return False
        mh = self._minhash(key)
        if self.lsh.query(mh):
            self.near_rejected += 1
            return False
        self.lsh.insert(str(len(self.keys)), mh)
        self.keys.add(key)
        return True

    def stats(self) -> dict:
        return {"kept": len(self.keys), "exact_duplicates": self.exact_rejected,
                "near_duplicates": self.near_rejected}
