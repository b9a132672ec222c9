"""A deterministic WordPiece vocabulary learner, a drop-in for HF `tokenizers`' WordPieceTrainer.

Why our own: HF's WordPieceTrainer is not deterministic. The same captions give a different
vocabulary (token set and ids) from run to run (huggingface/tokenizers#1794). The cause, found
in huggingface/tokenizers#2066: BpeTrainer::tokenize_words hands out the ids of the
continuing-subword `##x` symbols in AHashMap iteration order (randomly seeded per process), and
the merge queue breaks ties between pairs of equal count by those ids. So two runs with the same
seed and data learn different merges. Here ties are broken by the pair's strings instead, which
makes the result a pure function of the word counts, hence also independent of the order of the
texts.

The algorithm is otherwise HF's: BPE with continuing-subword prefix "##" whose vocabulary is
the WordPiece vocabulary. Only vocabulary learning lives here; encoding stays HF `tokenizers`.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

Pair = tuple[str, str]


class _Normalizer(Protocol):
    def normalize_str(self, sequence: str) -> str: ...


class _PreTokenizer(Protocol):
    def pre_tokenize_str(self, sequence: str) -> list[tuple[str, tuple[int, int]]]: ...


def count_words(
    texts: Iterable[str], normalizer: _Normalizer, pre_tokenizer: _PreTokenizer
) -> Counter[str]:
    """How often each pre-tokenized word occurs in `texts`, streaming (texts are not kept).

    Equal to normalizing and pre-tokenizing each text with HF's BertNormalizer and
    BertPreTokenizer and counting the words, but ~6x faster: one round trip into `tokenizers`
    costs ~25 µs per caption, which would be most of the training time on 1M captions. So the
    raw texts are first cut at ASCII spaces and the distinct chunks counted, then each distinct
    chunk goes through the normalizer and pre-tokenizer once. That is exact for the Bert pair: a
    space survives BertNormalizer (cleanup maps whitespace to spaces, NFD and accent stripping
    never reorder across a base character, lowercasing and CJK padding are per character) and
    BertPreTokenizer always splits on it, so no word spans a space. A normalizer or pre-tokenizer
    where that does not hold (e.g. Metaspace) must not be used with this function.
    """
    chunks: Counter[str] = Counter()
    for text in texts:
        chunks.update(text.split(" "))
    words: Counter[str] = Counter()
    for chunk, n in chunks.items():
        if not chunk:
            continue
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(chunk)):
            words[word] += n
    return words


def learn_vocab(
    word_counts: Mapping[str, int],
    vocab_size: int,
    min_frequency: int = 1,
    special_tokens: Sequence[str] = (),
    prefix: str = "##",
) -> dict[str, int]:
    """The WordPiece vocabulary (token -> id) HF's WordPieceTrainer learns, with a total order.

    Ids: `special_tokens` first, then every character of the words (sorted), then the `prefix`
    forms of the characters seen after a word's first position (sorted; HF gives these ids in
    hash order, the bug), then merged tokens in merge order. Each step merges the adjacent pair
    with the highest count (summed over word frequencies); equal counts go to the smaller
    (left, right) string pair. Training stops at `vocab_size` tokens (never dropping the
    alphabet, as HF), when no pair is left, or when the best pair occurs fewer than
    `min_frequency` times. A merged token is left + right without right's prefix; when that
    string is already a token (two merge paths to one string), it keeps its id, as in HF.

    Complexity: pair counts are kept incrementally. An index pair -> words holding it means a
    merge only touches the words that contain the pair (O(occurrences) per merge, not a rescan of
    all words), and a heap of (-count, left, right) with lazy invalidation finds the best pair in
    O(log n): every count change pushes a fresh entry, and popped entries whose count is no longer
    current are dropped. 100k distinct words and 8000 merges take seconds.
    """
    vocab: dict[str, int] = {}
    for token in special_tokens:
        vocab.setdefault(token, len(vocab))
    alphabet = sorted({c for w in word_counts for c in w})
    continuing = sorted({c for w in word_counts for c in w[1:]})
    for token in [*alphabet, *(prefix + c for c in continuing)]:
        vocab.setdefault(token, len(vocab))

    # Words of one symbol have no pairs and never change; leave them out.
    words: list[list[str]] = []
    freqs: list[int] = []
    for w in sorted(word_counts):
        if len(w) > 1 and word_counts[w] > 0:
            words.append([w[0], *(prefix + c for c in w[1:])])
            freqs.append(word_counts[w])

    counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for i, (syms, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(syms, syms[1:], strict=False):
            counts[pair] += f
            where[pair].add(i)
    heap = [(-n, a, b) for (a, b), n in counts.items()]
    heapq.heapify(heap)
    cut = len(prefix)

    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        n = counts.get((a, b), 0)
        if n != -neg:
            continue  # stale: a current entry was pushed when the count last changed
        if n < min_frequency:
            break
        new = a + (b[cut:] if b.startswith(prefix) else b)
        vocab.setdefault(new, len(vocab))

        # Merge left to right without overlap in every word that (may) hold the pair, noting the
        # pair count changes around each merge site. The index is not pruned when a word loses
        # a pair, so some words here no longer hold it; the scan simply finds nothing.
        delta: dict[Pair, int] = defaultdict(int)
        for i in where.pop((a, b)):
            syms, f = words[i], freqs[i]
            out: list[str] = []
            j, last = 0, len(syms) - 1
            while j <= last:
                if j < last and syms[j] == a and syms[j + 1] == b:
                    delta[(a, b)] -= f
                    if out:
                        left = out[-1]  # a previous merge in this word already counted (new, a)
                        delta[(left, a)] -= f
                        delta[(left, new)] += f
                        where[(left, new)].add(i)
                    if j + 1 < last:
                        right = syms[j + 2]
                        delta[(b, right)] -= f
                        delta[(new, right)] += f
                        where[(new, right)].add(i)
                    out.append(new)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[i] = out

        for pair, d in delta.items():
            if d:
                n = counts[pair] + d
                if n > 0:
                    counts[pair] = n
                    heapq.heappush(heap, (-n, *pair))
                else:
                    del counts[pair]
    return vocab


def train_vocab(
    texts: Iterable[str],
    normalizer: _Normalizer,
    pre_tokenizer: _PreTokenizer,
    vocab_size: int,
    min_frequency: int = 1,
    special_tokens: Sequence[str] = (),
) -> dict[str, int]:
    """`learn_vocab` over the words of `texts` (see `count_words`)."""
    return learn_vocab(
        count_words(texts, normalizer, pre_tokenizer), vocab_size, min_frequency, special_tokens
    )
