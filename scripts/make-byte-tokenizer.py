#!/usr/bin/env python3
"""Write tests/data/byte_tokenizer.json: a 256-token byte-level tokenizer (token id i = byte i).

It is the tokenizer for the tiny random test models (vocab_size 256): every UTF-8 string encodes
to its bytes, one token each, and any id sequence decodes back to those bytes. Built with the
Python `tokenizers` package as a byte-level BPE with no merges (GPT-2's byte -> printable
character alphabet as token strings, no regex split, no prefix space), so the output is
deterministic for a given `tokenizers` version.

Usage: python3 scripts/make-byte-tokenizer.py [OUT]   (default tests/data/byte_tokenizer.json)
"""

import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build():
    alphabet = bytes_to_unicode()
    assert sorted(alphabet.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def check(tok):
    assert tok.get_vocab_size() == 256
    assert tok.encode("hi").ids == [104, 105], tok.encode("hi").ids
    assert tok.decode([104, 105]) == "hi"
    rng = random.Random(0)
    texts = [
        "",
        " ",
        "  leading and trailing  ",
        "Hello world, this is kiln.",
        "tabs\tand\nnewlines\r\n",
        "héllo wörld — 中文 🦙 Ꙋ \u00a0\u200b",
        "".join(chr(c) for c in range(128)),
    ]
    # random code points (no surrogates) from every UTF-8 length
    for _ in range(200):
        cps = [rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0xE000, 0x10000),
                           rng.randrange(0x10000, 0x110000)]) for _ in range(rng.randrange(1, 30))]
        texts.append("".join(map(chr, cps)))
    for t in texts:
        ids = tok.encode(t).ids
        assert ids == list(t.encode("utf-8")), (t, ids)
        assert tok.decode(ids) == t, (t, tok.decode(ids))
    # every byte on its own is one token and comes back as itself
    assert tok.encode(bytes(range(128)).decode("ascii")).ids == list(range(128))
    assert [tok.id_to_token(i) for i in range(256)] == [bytes_to_unicode()[i] for i in range(256)]
    return len(texts)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests/data/byte_tokenizer.json"
    tok = build()
    n = check(tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    # the written file loads back and behaves the same
    n = check(Tokenizer.from_file(str(out)))
    print(f"wrote {out} ({out.stat().st_size} bytes); {n} UTF-8 round trips ok; 'hi' -> {tok.encode('hi').ids}")


if __name__ == "__main__":
    main()
