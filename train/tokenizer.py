"""Text tokenizer: a WordPiece trained on the corpus captions (vocabulary learned by our
deterministic `wordpiece_trainer`, encoding by HF `tokenizers`), or any `tokenizer.json` by path.
The wrapper knows the special ids MLM and batch assembly need."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Batches are tokenized in forked loader workers; the Rust thread pool must not be used there.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import (  # noqa: E402
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from vlforge.errors import UserError  # noqa: E402
from vlforge.train.wordpiece_trainer import train_vocab  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Names other tokenizers give the same roles (BERT, RoBERTa/BART, CLIP).
_ROLE_NAMES = {
    "pad": ["[PAD]", "<pad>", "<|endoftext|>"],
    "cls": ["[CLS]", "<s>", "<|startoftext|>"],
    "sep": ["[SEP]", "</s>", "<|endoftext|>"],
    "mask": ["[MASK]", "<mask>"],
    "unk": ["[UNK]", "<unk>"],
}


@dataclass
class Encoded:
    ids: list[int]
    type_ids: list[int]
    word_ids: list[int | None]  # None on special tokens; whole-word masking groups by this
    special: list[bool]


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus its special ids; picklable, so loader workers get a copy."""

    def __init__(self, tokenizer: Tokenizer, path: str | None = None):
        self.tok = tokenizer
        self.path = path
        vocab = tokenizer.get_vocab()

        def find(role: str) -> int | None:
            return next((vocab[n] for n in _ROLE_NAMES[role] if n in vocab), None)

        self.pad_id = find("pad")
        self.cls_id = find("cls")
        self.sep_id = find("sep")
        self.mask_id = find("mask")
        self.unk_id = find("unk")
        if self.pad_id is None:
            self.pad_id = 0
        self.special_ids = sorted(
            {
                i
                for i in (self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id)
                if i is not None
            }
            | {
                tokenizer.token_to_id(t.content)
                for t in tokenizer.get_added_tokens_decoder().values()
                if t.special
            }
        )

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, max_len: int) -> Encoded:
        enc = self.tok.encode(text)
        ids, types, words = list(enc.ids), list(enc.type_ids), list(enc.word_ids)
        special = [bool(m) for m in enc.special_tokens_mask]
        if len(ids) > max_len:
            # Truncate the body and keep the closing special token, as BERT's truncation does.
            tail = 1 if special and special[-1] else 0
            keep = max_len - tail
            ids = ids[:keep] + ids[len(ids) - tail :]
            types = types[:keep] + types[len(types) - tail :]
            words = words[:keep] + words[len(words) - tail :]
            special = special[:keep] + special[len(special) - tail :]
        return Encoded(
            ids, types, [None if s else w for w, s in zip(words, special, strict=True)], special
        )

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    if not Path(path).is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        return TextTokenizer(Tokenizer.from_file(str(path)), str(path))
    except Exception as exn:
        raise UserError(f"not a tokenizer.json: {path} ({str(exn).splitlines()[0]})") from None


def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1, lowercase: bool = True
) -> TextTokenizer:
    """A BERT-style WordPiece (lowercased, [CLS] A [SEP] B [SEP]) trained on `texts`.

    The vocabulary is learned by our own `wordpiece_trainer`, not HF's WordPieceTrainer: that one
    gives a different vocabulary on every run from the same texts (huggingface/tokenizers#1794,
    cause in #2066: ties between merges are broken by hash-ordered ids), so same-seed training
    runs were not reproducible. Ours is HF's algorithm with ties broken by the pair's strings:
    the same texts, in any order, give the same vocabulary. Encoding is still HF `tokenizers`.
    """
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = train_vocab(
        texts,
        normalizer,
        pre_tokenizer,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
    )
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    # As the HF trainer did: the special tokens are also added tokens (matched before
    # normalization, flagged in the special-tokens mask, skipped by decode).
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return TextTokenizer(tok)


def corpus_captions(urls: list[str], limit: int | None = None) -> Iterator[str]:
    """Captions (`txt`) of the shards in order, without decoding images."""
    from vlforge.train.data import iter_shard

    n = 0
    for url in urls:
        for raw in iter_shard(url):
            if "txt" in raw:
                yield raw["txt"].decode("utf-8")
                n += 1
                if limit is not None and n >= limit:
                    return
