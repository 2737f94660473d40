"""A byte-level BPE tokenizer trained here, on the training text: GPT-2's scheme, small enough to read.

Text is first cut into pre-tokens by GPT-2's pattern (written for Python's `re`): a word with its
leading space, a number, a run of punctuation, a run of whitespace. Each pre-token's UTF-8 bytes are
ids 0-255, and the learned merges join adjacent pairs, most frequent pair first, never across
pre-tokens. Every byte has an id and the pattern matches every character, so any string of Unicode
characters (not lone surrogates, which have no UTF-8) round-trips: decode(encode(s)) == s. The id after the merges is the end-of-text token that separates stories;
`encode` never produces it.

Saved as JSON (merges as pairs of ids), never pickled: a reader can inspect it and load it safely.
Written by hand rather than taken from a library: the whole algorithm is the 60 lines below, and a
run needs nothing downloaded.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

# GPT-2's pre-tokenizer: \p{L} is [^\W\d_] in Python's re, \p{N} is \d, and the punctuation class
# [^\s\p{L}\p{N}] is (?:[^\s\w]|_).
PATTERN = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
EOT_TEXT = "<|endoftext|>"
FORMAT = "esper-bpe-1"


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer:
    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = merges
        self.ranks = {pair: 256 + i for i, pair in enumerate(merges)}  # pair -> id (lower: merged first)
        self.vocab = [bytes([i]) for i in range(256)]  # id -> bytes
        for a, b in merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.eot = len(self.vocab)
        self.vocab_size = self.eot + 1
        self._words: dict[str, list[int]] = {}  # pre-token -> ids: stories repeat their words

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn vocab_size - 257 merges (fewer if no pair is left to merge).

        Counts are kept per distinct pre-token and updated incrementally: a merge only revisits the
        words that contain its pair, and a heap with lazy deletion finds the most frequent pair
        (ties go to the smallest pair, so training is deterministic).
        """
        counts = Counter(w for text in texts for w in PATTERN.findall(text))
        words = [list(w.encode()) for w in counts]  # ids of each distinct pre-token
        freq = list(counts.values())
        pair_freq: Counter[tuple[int, int]] = Counter()
        holders: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that had it
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_freq[pair] += freq[i]
                holders[pair].add(i)
        heap = [(-f, pair) for pair, f in pair_freq.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while len(merges) < vocab_size - 257 and heap:
            neg_f, pair = heapq.heappop(heap)
            if pair_freq.get(pair) != -neg_f:
                continue  # a stale entry: the pair's count changed since it was pushed
            new_id = 256 + len(merges)
            merges.append(pair)
            touched = set()
            for i in holders.pop(pair):
                old = words[i]
                new = merge(old, pair, new_id)
                if len(new) == len(old):
                    continue  # an earlier merge already took this word's occurrence
                for p in zip(old, old[1:]):
                    pair_freq[p] -= freq[i]
                for p in zip(new, new[1:]):
                    pair_freq[p] += freq[i]
                    holders[p].add(i)
                touched.update(zip(old, old[1:]), zip(new, new[1:]))
                words[i] = new
            for p in touched:
                if pair_freq[p] > 0:
                    heapq.heappush(heap, (-pair_freq[p], p))
                else:
                    del pair_freq[p]
        return cls(merges)

    def _encode_word(self, word: str) -> list[int]:
        """Apply the merges in training order: always the earliest-learned pair present first."""
        if word not in self._words:
            ids = list(word.encode())
            while len(ids) > 1:
                pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, self.eot))
                if pair not in self.ranks:
                    break
                ids = merge(ids, pair, self.ranks[pair])
            self._words[word] = ids
        return self._words[word]

    def encode(self, text: str) -> list[int]:
        return [i for word in PATTERN.findall(text) for i in self._encode_word(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; the end-of-text id reads as <|endoftext|>. Bytes that are not valid
        UTF-8 (a sample cut inside a character) become U+FFFD."""
        eot = EOT_TEXT.encode()
        return b"".join(eot if i == self.eot else self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "pattern": PATTERN.pattern, "merges": self.merges})

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        """Raises ValueError (json's, or ours) on a file that is not an esper BPE tokenizer."""
        blob = json.loads(path.read_text())
        if blob.get("format") != FORMAT or blob.get("pattern") != PATTERN.pattern:
            raise ValueError(f"{path} is not an {FORMAT} tokenizer with this pre-tokenizer")
        return cls([(a, b) for a, b in blob["merges"]])
