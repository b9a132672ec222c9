"""The WordPiece trainer: deterministic (same texts in any order -> same vocabulary), HF's
algorithm (checked against a plain rescan-every-merge reference and against HF's
WordPieceTrainer where HF is deterministic), and the tokenizer `train_wordpiece` builds on it."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vlforge.train.tokenizer import SPECIAL_TOKENS, train_wordpiece
from vlforge.train.wordpiece_trainer import count_words, learn_vocab


def _reference(
    word_counts: dict[str, int], vocab_size: int, min_frequency: int = 1
) -> tuple[dict[str, int], bool]:
    """The algorithm written plainly: recount every pair before each merge. Also says whether a
    merge was picked among pairs of equal count (where HF's choice depends on hash order)."""
    vocab: dict[str, int] = {}
    for t in [
        *SPECIAL_TOKENS,
        *sorted({c for w in word_counts for c in w}),
        *sorted({"##" + c for w in word_counts for c in w[1:]}),
    ]:
        vocab.setdefault(t, len(vocab))
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in word_counts}
    tied = False
    while len(vocab) < vocab_size:
        counts: Counter[tuple[str, str]] = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:], strict=False):
                counts[pair] += word_counts[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < min_frequency:
            break
        tied |= sum(n == counts[best] for n in counts.values()) > 1
        a, b = best
        new = a + b.removeprefix("##")
        vocab.setdefault(new, len(vocab))
        for w, syms in words.items():
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[w] = out
    return vocab, tied


def _hf_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
    """The vocabulary HF's WordPieceTrainer learns, set up as train_wordpiece used to."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.get_vocab()


def _captions(n: int = 300, seed: int = 0) -> list[str]:
    """Short captions with many pairs of equal count, where HF's trainer is not deterministic:
    on these, 10 runs of HF's WordPieceTrainer at vocab_size 100 gave 10 different vocab dicts
    and 8 different token sets (tokenizers 0.23.3). All merges done, the vocabulary has 124."""
    rng = random.Random(seed)
    return [
        f"A {rng.choice(['photo', 'picture', 'drawing'])} of a "
        f"{rng.choice(['red', 'blue', 'green', 'big', 'small', 'striped'])} "
        f"{rng.choice(['cat', 'dog', 'car', 'tree', 'bicycle', 'horse'])} "
        f"{rng.choice(['on', 'near', 'under', 'behind'])} the "
        f"{rng.choice(['table', 'street', 'grass', 'wall', 'bridge'])}."
        for _ in range(n)
    ]


def test_same_texts_same_vocab_in_any_order():
    texts = _captions()
    first = train_wordpiece(texts, vocab_size=100).tok.get_vocab()
    assert train_wordpiece(texts, vocab_size=100).tok.get_vocab() == first
    shuffled = texts[:]
    random.Random(1).shuffle(shuffled)
    assert train_wordpiece(iter(shuffled), vocab_size=100).tok.get_vocab() == first
    assert len(first) == 100


def test_ties_go_to_the_smaller_string_pair():
    # (a, ##b) and (c, ##d) both occur twice; room for one merge.
    base = len(SPECIAL_TOKENS) + 4 + 2
    vocab = learn_vocab({"cd": 2, "ab": 2}, base + 1, special_tokens=SPECIAL_TOKENS)
    assert "ab" in vocab and "cd" not in vocab


@pytest.mark.parametrize("seed", range(40))
def test_incremental_counts_match_the_rescan_reference(seed):
    # Small alphabets, repeated letters (overlapping pairs like ##a ##a ##a), many ties, merges
    # that reach an existing token, and min_frequency cut-offs.
    rng = random.Random(seed)
    letters = "abcde"[: rng.randint(2, 5)]
    word_counts = {
        "".join(rng.choice(letters) for _ in range(rng.randint(1, 9))): rng.randint(1, 6)
        for _ in range(rng.randint(1, 40))
    }
    vocab_size, min_frequency = rng.randint(5, 120), rng.randint(0, 4)
    got = learn_vocab(word_counts, vocab_size, min_frequency, SPECIAL_TOKENS)
    assert got == _reference(word_counts, vocab_size, min_frequency)[0]


def test_parity_with_hf_where_hf_is_deterministic():
    # Chains of words that extend one another, each word's count a distinct power of two: a
    # pair's count is the sum of the counts of the words holding it, so two pairs tie only if
    # they occur in exactly the same words, which the chains avoid to the last merge (checked
    # below). Without ties HF's merge order does not depend on its hash-ordered ids.
    chains = [
        ["to", "tow", "towe", "tower", "towers"],
        ["ng", "ing", "ting", "sting", "esting", "es"],
        ["ca", "cat", "cats"],
        ["re", "red"],
    ]
    words = [w for chain in chains for w in chain]
    rng = random.Random(0)
    exponents = rng.sample(range(len(words)), len(words))
    word_counts = {w: 2**e for w, e in zip(words, exponents, strict=True)}
    reference, tied = _reference(word_counts, 10**6)
    assert not tied
    tokens = [w.capitalize() if i % 3 == 0 else w for w in words for i in range(word_counts[w])]
    rng.shuffle(tokens)
    texts = [" ".join(tokens[i : i + 7]) + "." for i in range(0, len(tokens), 7)]

    ours = train_wordpiece(texts, vocab_size=10**4).tok.get_vocab()
    hf = _hf_vocab(texts, vocab_size=10**4)
    assert set(ours) == set(hf) == set(reference) | {"."}
    assert len(ours) > len(SPECIAL_TOKENS) + 30  # merges happened, to the end of every word
    # Same ids for specials, the alphabet (HF sorts it too) and the merges (in merge order); the
    # single-character "##x" forms share one id range, ordered by hash in HF, sorted in ours.
    continuing = {t for t in ours if t.startswith("##") and len(t) == 3}
    assert {t: i for t, i in ours.items() if t not in continuing} == {
        t: i for t, i in hf.items() if t not in continuing
    }
    assert sorted(ours[t] for t in continuing) == sorted(hf[t] for t in continuing)
    assert sorted(continuing, key=ours.__getitem__) == sorted(continuing)


def test_vocab_size_is_a_cap():
    texts = _captions()
    for size in (60, 77, 124):
        assert train_wordpiece(texts, vocab_size=size).vocab_size == size
    assert train_wordpiece(texts, vocab_size=500).vocab_size == 124  # no pairs left
    # Below the alphabet nothing is merged and nothing dropped, as in HF.
    words = {w for t in texts for w in t.lower().replace(".", " .").split()}
    base = len(SPECIAL_TOKENS) + len(set("".join(words))) + len({c for w in words for c in w[1:]})
    vocab = train_wordpiece(texts, vocab_size=1).tok.get_vocab()
    assert len(vocab) == base
    assert all(len(t.removeprefix("##")) == 1 for t in vocab if t not in SPECIAL_TOKENS)


def test_min_frequency_stops_merges():
    # Pairs: (p, ##q) 5 times; (x, ##y) and (##y, ##z) twice each.
    texts = ["xyz xyz", "pq pq pq pq pq"]
    merged = {t for t in train_wordpiece(texts, vocab_size=100).tok.get_vocab() if t[0] != "["}
    merged = {t for t in merged if len(t.removeprefix("##")) > 1}
    assert merged == {"pq", "##yz", "xyz"}  # the tie (##y, ##z) < (x, ##y) goes first
    vocab = train_wordpiece(texts, vocab_size=100, min_frequency=3).tok.get_vocab()
    assert "pq" in vocab and not {"##yz", "xyz"} & set(vocab)
    vocab = train_wordpiece(texts, vocab_size=100, min_frequency=6).tok.get_vocab()
    assert "pq" not in vocab


def test_special_tokens_and_round_trip():
    tok = train_wordpiece(_captions(), vocab_size=100)
    vocab = tok.tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == [0, 1, 2, 3, 4]

    enc = tok.encode("A photo of a green dog on the grass.", max_len=64)
    assert enc.ids[0] == tok.cls_id and enc.ids[-1] == tok.sep_id
    assert tok.unk_id not in enc.ids
    assert enc.special == [True] + [False] * (len(enc.ids) - 2) + [True]
    assert tok.decode(enc.ids) == "a photo of a green dog on the grass."
    # Special tokens in text are matched whole, as the HF trainer's added tokens were.
    assert tok.encode("a [MASK] cat", max_len=16).ids[2] == tok.mask_id


@pytest.mark.parametrize("lowercase", [True, False])
def test_count_words_equals_counting_each_text(lowercase):
    # count_words counts space-separated chunks before normalizing; that must give what
    # normalizing and pre-tokenizing each whole text gives, whitespace and accents included.
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    pieces = [
        "Cat", "DOG", "Éclair", "naïve", "e\u0301", "\u0301x", " ", "  ", "\t", "\n", "\u00a0",
        "\u3000", "\x1c", "\x00", "\ufffd", ".", ",", "'s", "猫", "の", "ΣΟΦΊΑ", "İ", "ß", "#",
        "[MASK]", "\u200b", "\u2028",
    ]  # fmt: skip
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(2000)]
    expected: Counter[str] = Counter()
    for text in texts:
        expected.update(
            w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        )
    assert count_words(iter(texts), normalizer, pre_tokenizer) == expected
