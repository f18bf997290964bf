"""Near-duplicate filtering: ROUGE-L F ≥ threshold against any kept instruction (Alpaca's rule),
decided exactly, without comparing every pair.

Alpaca compares each candidate with every kept instruction (quadratic). Here a candidate index
proposes neighbours and exact ROUGE-L decides. The index is lossless: ROUGE-L F = 2·LCS/(|a|+|b|)
and LCS ≤ the multiset overlap of the two token lists, so a pair can reach the threshold only if
(1) the lengths are within a factor (2-t)/t of each other and (2) the token overlap is at least
t·|a|/(2-t). Condition (2) lets us use prefix filtering (as in set-similarity joins): order each
token list by a fixed global order, and two lists with enough overlap must share a token within
their first |x| - min_overlap + 1 tokens. Only those pairs are scored. The decisions are the
quadratic procedure's, to the bit; only the work differs.

Tokenization is rouge-score's default (lowercase, runs of [a-z0-9]), so scores equal the
``rouge-score`` package's (tested).
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field

# The most frequent English words go last in the global token order, so prefixes hold rare words
# and probe few candidates. Any fixed order is correct; this one is fast.
_COMMON = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "that",
    "this",
    "it",
    "be",
    "are",
    "or",
    "from",
    "at",
    "your",
    "you",
    "what",
    "how",
    "write",
    "give",
    "make",
    "create",
    "describe",
    "explain",
    "list",
    "find",
    "following",
    "given",
    "each",
    "which",
    "who",
    "why",
    "when",
    "about",
    "into",
    "using",
    "use",
    "text",
    "sentence",
    "word",
    "words",
    "following",
    "provide",
    "generate",
    "can",
    "do",
    "me",
    "i",
    "my",
    "one",
    "two",
    "three",
    "not",
    "all",
    "some",
    "any",
    "more",
    "most",
    "than",
    "then",
    "if",
    "there",
    "their",
    "they",
    "them",
    "these",
    "those",
    "was",
    "were",
    "been",
    "has",
    "have",
    "had",
    "will",
    "would",
    "should",
    "could",
    "new",
    "best",
    "way",
    "example",
    "examples",
    "between",
]
_COMMON_RANK = {word: rank for rank, word in enumerate(reversed(_COMMON))}
_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: lowercase alphanumeric runs."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyrö): O(|a|·|b|/64)."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a  # the bit vector over the longer list
    masks: dict[int, int] = {}
    for position, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << position)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        match = row & masks.get(token, 0)
        row = ((row + match) | (row - match)) & full
    return len(a) - row.bit_count()


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F-measure of two token-id lists: 2·LCS/(|a|+|b|)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


@dataclass
class Neighbour:
    index: int
    score: float


@dataclass
class NearDuplicateIndex:
    """Kept instructions, with a lossless candidate index for the ROUGE-L ≥ threshold test."""

    threshold: float = 0.7
    texts: list[str] = field(default_factory=list)
    _token_ids: list[list[int]] = field(default_factory=list)
    _tagged: list[frozenset[int]] = field(default_factory=list)
    _vocabulary: dict[str, int] = field(default_factory=dict)
    _order_keys: list[tuple[int, int]] = field(default_factory=list)
    _postings: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in tokenize(text):
            token_id = self._vocabulary.get(token)
            if token_id is None:
                token_id = self._vocabulary[token] = len(self._vocabulary)
                self._order_keys.append((_COMMON_RANK.get(token, -1), zlib.crc32(token.encode())))
            ids.append(token_id)
        return ids

    def _prefix(self, ids: list[int]) -> list[tuple[int, int]]:
        """The first tokens of ``ids`` in the global order that any qualifying pair must share.
        Repeated tokens are told apart by occurrence number, so overlaps count multisets."""
        tagged = _with_occurrences(ids)
        tagged.sort(key=lambda item: (self._order_keys[item[0]], item[1]))
        t = self.threshold
        min_overlap = math.ceil(t * len(ids) / (2 - t) - 1e-9)
        return tagged[: max(len(ids) - min_overlap + 1, 0)]

    def neighbours(self, text: str, ids: list[int] | None = None) -> list[Neighbour]:
        """Kept instructions that could reach the threshold, with exact ROUGE-L, best first."""
        ids = self.encode(text) if ids is None else ids
        if not ids:
            return []
        t = self.threshold
        low, high = len(ids) * t / (2 - t) - 1e-9, len(ids) * (2 - t) / t + 1e-9
        candidates: set[int] = set()
        for key in self._prefix(ids):
            candidates.update(self._postings.get(key, ()))
        tagged = _tagged_set(ids)
        found = []
        for index in candidates:
            other = self._token_ids[index]
            if not low <= len(other) <= high:
                continue
            overlap = len(tagged & self._tagged[index])  # multiset overlap, in C
            if 2 * overlap / (len(ids) + len(other)) < t - 1e-12:
                continue  # even a perfect order could not reach the threshold
            found.append(Neighbour(index, rouge_l(ids, other)))
        found.sort(key=lambda n: (-n.score, n.index))
        return found

    def add(self, text: str, ids: list[int] | None = None) -> int:
        ids = self.encode(text) if ids is None else ids
        index = len(self.texts)
        self.texts.append(text)
        self._token_ids.append(ids)
        self._tagged.append(_tagged_set(ids))
        for key in self._prefix(ids):
            self._postings.setdefault(key, []).append(index)
        return index

    def check_and_add(self, text: str) -> tuple[bool, list[Neighbour]]:
        """Keep ``text`` unless some kept instruction has ROUGE-L ≥ threshold with it. Returns
        (kept, neighbours found, best first)."""
        ids = self.encode(text)
        found = self.neighbours(text, ids)
        if found and found[0].score >= self.threshold:
            return False, found
        self.add(text, ids)
        return True, found


def _with_occurrences(ids: list[int]) -> list[tuple[int, int]]:
    """Each token id with its occurrence number (0 for the first, 1 for a repeat, ...)."""
    seen: Counter[int] = Counter()
    tagged = []
    for token_id in ids:
        tagged.append((token_id, seen[token_id]))
        seen[token_id] += 1
    return tagged


def _tagged_set(ids: list[int]) -> frozenset[int]:
    """Token ids tagged with their occurrence number: set overlap of these = multiset overlap."""
    return frozenset(token_id << 16 | min(occurrence, 0xFFFF) for token_id, occurrence in _with_occurrences(ids))


def quadratic_dedup(texts: list[str], threshold: float = 0.7) -> list[bool]:
    """Alpaca's procedure, for reference and benchmarks: every candidate against every kept one."""
    index = NearDuplicateIndex(threshold)
    kept_ids: list[list[int]] = []
    decisions = []
    for text in texts:
        ids = index.encode(text)
        keep = all(rouge_l(ids, other) < threshold for other in kept_ids)
        if keep:
            kept_ids.append(ids)
        decisions.append(keep)
    return decisions
