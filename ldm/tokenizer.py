"""Build a BERT WordPiece vocabulary from the captions of a file list.

For users with no local `bert-base-uncased`: the result is a directory that
`paddlenlp.transformers.BertTokenizer.from_pretrained` (and so the stock pipeline) loads.
Whole words seen in the captions become tokens, most frequent first; every character
seen is also a token and a `##` continuation piece, so any caption tokenizes without
[UNK] for characters that occurred.
"""
import argparse
import os
import sys
from collections import Counter
from typing import Iterable

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def iter_captions(file_list: str) -> Iterable[str]:
    from ldm.data import iter_unit_lines, make_units, parse_line, read_file_list, SkipCounter

    skips = SkipCounter()
    for entry in read_file_list(file_list):
        for unit in make_units(entry.parts, 1):
            for _, raw in iter_unit_lines(unit, skips):
                caption, _, reason = parse_line(raw)
                if reason is None:
                    yield caption


def build_vocab(captions: Iterable[str], max_words: int = 30000, min_count: int = 1):
    from paddlenlp.transformers.bert.tokenizer import BasicTokenizer

    basic = BasicTokenizer(do_lower_case=True)
    words, chars = Counter(), set()
    for caption in captions:
        for word in basic.tokenize(caption):
            words[word] += 1
            chars.update(word)
    vocab = list(SPECIAL)
    vocab += sorted(chars) + ["##" + c for c in sorted(chars)]
    seen = set(vocab)
    for word, count in words.most_common():
        if len(vocab) >= max_words + len(SPECIAL) + 2 * len(chars):
            break
        if count >= min_count and word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def write_tokenizer(vocab, output_dir: str, model_max_length: int = 77) -> str:
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
    parser.add_argument("--file_list", required=True, help="File list (SPEC section 2) whose captions make the vocabulary.")
    parser.add_argument("--output_dir", required=True, help="Directory to write vocab.txt and the tokenizer config into.")
    parser.add_argument("--max_words", type=int, default=30000, help="Most frequent whole words kept (besides specials and characters).")
    parser.add_argument("--model_max_length", type=int, default=77, help="Tokens per caption after padding or truncation.")
    args = parser.parse_args(argv)
    try:
        vocab = build_vocab(iter_captions(args.file_list), args.max_words)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_tokenizer(vocab, args.output_dir, args.model_max_length)
    print(f"{args.output_dir}: {len(vocab)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())


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
