"""Near-duplicate filtering: ROUGE-L F ≥ threshold against any kept instruction (Alpaca's rule),
decided exactly, without comparing every pair.

The score is rouge-score's, operation for operation: ``rouge_scorer._score_lcs(new, kept)``
computes precision = LCS/|kept|, recall = LCS/|new| and F = 2·P·R/(P+R) in floating point, and
``rouge_l`` does the same. The comparison is made on that floating-point value, so a decision is
exactly ``rouge_score``'s ``fmeasure >= threshold``, ties included: when 2·LCS/(|a|+|b|) equals
the threshold as a fraction, rouge-score's F can land an ulp below it (L=21 with 23+37 tokens
gives 0.6999999999999998 < 0.7: kept) or above it (rejected). Alpaca's code rejects on ``> 0.7``;
distill rejects on ``>=`` as configured. F is the same float whichever list is the target
(doubling is exact, so 2·P·R and 2·R·P are one real product rounded once; P+R = R+P).

Alpaca compares each candidate with every kept instruction (quadratic). Here a candidate index
proposes neighbours and the score above decides. The index is lossless: rouge-score's F is within
a few ulps of the exact 2·LCS/(|a|+|b|), so a pair can reach the threshold t only if that exact
value is ≥ t' = t - 1e-9 (``_MARGIN``); and LCS ≤ the multiset overlap of the two token lists,
so (1) the lengths are within a factor (2-t')/t' of each other and (2) the token overlap is at
least t'·|a|/(2-t'). Condition (2) lets us use prefix filtering (as in set-similarity joins):
order each token list by one total order on tokens (common words last, then crc32, then the token
itself so that crc32 collisions are ordered too), and two lists with enough overlap must share a
token within their first |x| - min_overlap + 1 tokens. Only those pairs are scored. The decisions
are the quadratic procedure's, to the bit; only the work differs.

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
# rouge-score's F is within ~1e-15 of the exact 2·LCS/(|a|+|b|); candidate bounds use the threshold
# minus this margin, so they keep every pair whose floating-point F can reach the threshold.
_MARGIN = 1e-9


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


def rouge_l(target: list[int], prediction: list[int]) -> float:
    """ROUGE-L F-measure of two token-id lists, computed as ``rouge_scorer._score_lcs`` does
    (same operations in the same order, so the same float; symmetric in its arguments)."""
    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    precision = lcs / len(prediction)
    recall = lcs / len(target)
    if precision + recall > 0:  # rouge_score.scoring.fmeasure
        return 2 * precision * recall / (precision + recall)
    return 0.0


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
    _order_keys: list[tuple[int, int, str]] = field(default_factory=list)
    _postings: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in tokenize(text):
            token_id = self._vocabulary.get(token)
            if token_id is None:
                token_id = self._vocabulary[token] = len(self._vocabulary)
                # The token itself breaks crc32 collisions: prefix filtering needs a total order.
                self._order_keys.append((_COMMON_RANK.get(token, -1), zlib.crc32(token.encode()), token))
            ids.append(token_id)
        return ids

    def _prefix(self, ids: list[int]) -> list[tuple[int, int]]:
        """The first tokens of ``ids`` in the global order that any qualifying pair must share.
        Repeated tokens are told apart by occurrence number, so overlaps count multisets."""
        tagged = _with_occurrences(ids)
        tagged.sort(key=lambda item: (self._order_keys[item[0]], item[1]))
        t = self.threshold - _MARGIN
        min_overlap = math.ceil(t * len(ids) / (2 - t))
        return tagged[: max(len(ids) - min_overlap + 1, 0)]

    def neighbours(self, text: str, ids: list[int] | None = None) -> list[Neighbour]:
        """Kept instructions that could reach the threshold, with rouge-score's ROUGE-L F, best first."""
        ids = self.encode(text) if ids is None else ids
        if not ids:
            return []
        t = self.threshold - _MARGIN
        low, high = len(ids) * t / (2 - t), len(ids) * (2 - t) / t
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
            if 2 * overlap / (len(ids) + len(other)) < t:
                continue  # even a perfect order could not reach the threshold
            found.append(Neighbour(index, rouge_l(ids, other)))  # Alpaca's order: target = the new one
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
        (kept, neighbours found, best first). ≥ is decided on rouge-score's floating-point F."""
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
        keep = all(rouge_l(ids, other) < threshold for other in kept_ids)  # target = the new one
        if keep:
            kept_ids.append(ids)
        decisions.append(keep)
    return decisions
