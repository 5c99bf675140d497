"""Build a BERT WordPiece tokenizer from the captions of a file list.

For users with no local `bert-base-uncased`: the result is a directory that
`paddlenlp.transformers.BertTokenizer.from_pretrained` (and so the stock pipeline) loads.
The vocabulary is learnt by HF `tokenizers`' WordPiece trainer with BERT's normalisation
(lower case, accents stripped, split on whitespace and punctuation, CJK characters apart),
so frequent words are one token and a rare word is a few subword pieces (`##` continuations),
not one token per character. Only the caption column is read: no image is decoded.
"""
import argparse
import os
import sys
from typing import Callable, Iterable, List

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] is id 0, LDMBert's pad_token_id


def iter_captions(file_list: str) -> Iterable[str]:
    """The caption (column 1) of every record line of every part, once; parts that cannot be
    read are counted and logged by ldm.data as in training."""
    from ldm.data.records import SkipCounter
    from ldm.data.filelists import iter_unit_lines, make_units, read_file_list

    skips = SkipCounter()
    skips.where = "the tokenizer builder"
    for entry in read_file_list(file_list):
        for unit in make_units(entry.parts, 1):
            for _, raw in iter_unit_lines(unit, skips):
                if raw.count(b"\t") < 2:
                    continue  # not a record (training skips it as short_line)
                try:
                    yield raw[: raw.index(b"\t")].decode("utf-8")
                except UnicodeDecodeError:
                    continue


def build_vocab(read_captions: Callable[[], Iterable[str]], vocab_size: int = 30522) -> List[str]:
    """A WordPiece vocabulary of at most `vocab_size` tokens learnt from the captions, by id:
    the specials first, then the characters seen, then the learnt subwords and words.

    `read_captions()` is called twice (it must give the same captions each time): once for the
    characters, once to learn. The same captions always give the same vocabulary, which HF
    `tokenizers`' trainer alone does not (huggingface/tokenizers#1794: it numbers the "##c"
    continuation tokens in hash-map order, and those numbers break ties between merges, so two
    runs on the same data learnt different vocabularies here, and models trained on them
    differed). Given as special tokens in sorted order, every "##c" is numbered before training.
    """
    from tokenizers import BertWordPieceTokenizer

    # The same normalisation and pre-tokenisation as paddlenlp's BertTokenizer(do_lower_case=True).
    tokenizer = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    normalize = tokenizer._tokenizer.normalizer.normalize_str  # wraps tokenizers (no public accessor for the normalizer)
    seen = sorted({c for caption in read_captions() for c in normalize(caption) if not c.isspace()})
    numbered = SPECIAL + ["##" + c for c in seen]
    tokenizer.train_from_iterator(read_captions(), vocab_size=vocab_size, min_frequency=2, special_tokens=numbered, show_progress=False)
    vocab = tokenizer.get_vocab()
    learnt = sorted(vocab, key=vocab.get)
    # The trainer only has "##c" for characters it saw inside a word (and "c" for ones it saw
    # first), so an unseen word such as "sunflower" would be one [UNK]. Add the missing forms of
    # every character, making room by dropping the last (rarest) merges.
    chars = {t[2:] if t.startswith("##") else t for t in learnt if len(t.removeprefix("##")) == 1 and t not in SPECIAL}
    missing = sorted(form for c in chars for form in (c, "##" + c) if form not in vocab)
    return learnt[: max(len(SPECIAL), vocab_size - len(missing))] + missing


def write_tokenizer(vocab: List[str], output_dir: str, model_max_length: int = 77) -> str:
    from paddlenlp.transformers import BertTokenizer

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    # Round-trip through the tokenizer class so its config files are written too.
    tokenizer = BertTokenizer(os.path.join(output_dir, "vocab.txt"), do_lower_case=True, model_max_length=model_max_length)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--file_list", required=True, help="File list (SPEC section 2) whose captions the vocabulary is learnt from.")
    parser.add_argument("--output_dir", required=True, help="Directory to write vocab.txt and the tokenizer config into.")
    parser.add_argument("--vocab_size", type=int, default=30522, help="Tokens in the vocabulary at most (BERT's 30522 by default); fewer if the captions hold fewer.")
    parser.add_argument("--model_max_length", type=int, default=77, help="Tokens per caption after padding or truncation.")
    args = parser.parse_args(argv)
    if args.vocab_size < len(SPECIAL) + 1:
        parser.error(f"--vocab_size must be > {len(SPECIAL)} (the special tokens), got {args.vocab_size}")
    try:
        vocab = build_vocab(lambda: iter_captions(args.file_list), args.vocab_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(vocab) <= len(SPECIAL):
        print(f"error: --file_list {args.file_list!r} holds no caption to learn a vocabulary from", file=sys.stderr)
        return 2
    write_tokenizer(vocab, args.output_dir, args.model_max_length)
    print(f"{args.output_dir}: {len(vocab)} tokens")
    return 0


# Strings on which the fast twin must give exactly the paddlenlp tokenizer's ids.
PROBES = [
    "a red circle on a blue background, in the middle",
    "A Photo of Zürich's CAFÉ!! 12,000 people -- naïve   tabs\tand\nnewlines",
    "中文字幕 and emoji 🚀 mixed with unknownwordpiecesxyz",
    "",
    "word " * 120,
]


class CaptionEncoder:
    """Caption -> int64 ids padded or truncated to max_length, exactly as the paddlenlp tokenizer gives them.

    Wraps paddlenlp where it falls short on the data path: its pure-Python WordPiece costs
    ~0.5 ms a caption, a tenth of a data worker's per-record budget. For a BERT WordPiece
    tokenizer, HF `tokenizers`' Rust implementation of the same algorithm with the same vocab
    gives the same ids ~7x faster; it is used only if it matches on every probe above at
    start-up, else the paddlenlp tokenizer is used as is.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.fast = self._fast_twin()

    def slow_ids(self, caption: str):
        return self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.max_length)["input_ids"]

    def _fast_twin(self):
        from paddlenlp.transformers import BertTokenizer

        if not isinstance(self.tokenizer, BertTokenizer):
            return None
        try:
            from tokenizers import BertWordPieceTokenizer

            t = self.tokenizer
            fast = BertWordPieceTokenizer(t.get_vocab(), unk_token=t.unk_token, sep_token=t.sep_token, cls_token=t.cls_token,
                                          pad_token=t.pad_token, mask_token=t.mask_token, lowercase=bool(getattr(t, "do_lower_case", True)))
            fast.enable_truncation(self.max_length)
            fast.enable_padding(length=self.max_length, pad_id=t.pad_token_id, pad_token=t.pad_token)
        except Exception:
            return None
        if all(fast.encode(p).ids == list(self.slow_ids(p)) for p in PROBES):
            return fast
        return None

    def __call__(self, caption: str):
        import numpy as np

        ids = self.fast.encode(caption).ids if self.fast is not None else self.slow_ids(caption)
        return np.asarray(ids, dtype="int64")


if __name__ == "__main__":
    sys.exit(main())
