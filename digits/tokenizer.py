"""A CLIP BPE tokenizer whose vocabulary holds the prompts' words whole ("handwritten", "three",
"3", ...), with CLIP's 512 byte symbols as the fallback for any other text, capped at MAX_TOKENS.
Learning the text conditioning from characters is the hard part on a small budget; whole words make
"3" and "three" one token each."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from digits.data import WORDS

MAX_TOKENS = 32
PROMPT_WORDS = ("a", "handwritten", "digit", "the", "number", *WORDS)


def build_tokenizer():
    from transformers import CLIPTokenizer

    from exporters.builtin import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[str] = []
    for word in PROMPT_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            pair = f"{left} {right}"
            if pair not in merges:
                merges.append(pair)
            left += right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:  # CLIPTokenizer reads its merges from a file
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    for word in PROMPT_WORDS + tuple("0123456789"):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise AssertionError(f"the digits tokenizer splits {word!r} into {ids}")
    return tokenizer
