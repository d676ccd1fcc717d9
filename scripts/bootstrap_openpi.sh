#!/usr/bin/env bash
# Create .venv-openpi/ at the repository root: a second environment for the native openpi (PyTorch)
# adapter. openpi is not on PyPI and pins transformers 4.53.2 (patched) and torch 2.7.1, which
# cannot share .venv/ with LeRobot 0.6.1, so it gets its own environment built from a pinned
# openpi snapshot:
#   APT_OPENPI_SRC=/path/to/openpi      an openpi checkout (its repository root), or
#   APT_OPENPI_SNAPSHOT=/path/to.tar.gz  a tarball holding openpi/ (default: ../shared/upstreams/openpi-15a9616.tar.gz)
# Without either, it prints how to provide one and exits 0: the openpi tests then skip.
# Idempotent: an environment built from the same snapshot, pyproject.toml and this script is reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-openpi"
STAMP="$VENV/.apt-plugins-stamp"
SRC_DIR="$VENV/src"   # the unpacked snapshot lives inside the (git-ignored) environment

# The 3.12 interpreter discovery of bootstrap.sh, reused verbatim (only its function definitions).
# shellcheck disable=SC1090
source <(sed -n -e '/^is_312()/p' -e '/^find_python()/,/^}/p' "$ROOT/scripts/bootstrap.sh")

SNAPSHOT="${APT_OPENPI_SNAPSHOT:-$ROOT/../shared/upstreams/openpi-15a9616.tar.gz}"
if [[ -n "${APT_OPENPI_SRC:-}" ]]; then
    [[ -f "$APT_OPENPI_SRC/src/openpi/models_pytorch/pi0_pytorch.py" ]] || {
        echo "error: APT_OPENPI_SRC=$APT_OPENPI_SRC is not an openpi checkout (no src/openpi/models_pytorch/pi0_pytorch.py); point it at the repository root" >&2
        exit 1
    }
    SOURCE_ID="src:$(cd "$APT_OPENPI_SRC" && pwd)"
elif [[ -f "$SNAPSHOT" ]]; then
    SOURCE_ID="snapshot:$(sha256sum "$SNAPSHOT" | cut -d' ' -f1)"
else
    cat >&2 <<MSG
==> openpi environment skipped: no openpi snapshot at $SNAPSHOT.
    The openpi adapter tests (tests/openpi/) will skip. To run them, point at an openpi checkout or tarball:
        APT_OPENPI_SRC=/path/to/openpi make test          (a clone of Physical-Intelligence/openpi)
        APT_OPENPI_SNAPSHOT=/path/to/openpi.tar.gz make test
MSG
    exit 0
fi

fingerprint() {
    { cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap_openpi.sh"; echo "$SOURCE_ID"; } | sha256sum | cut -d' ' -f1
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]] && is_312 "$VENV/bin/python"; then
    exit 0
fi

if ! PY="$(find_python)"; then
    echo "error: no Python 3.12 interpreter found for .venv-openpi (see scripts/bootstrap.sh; or set APT_PYTHON=/path/to/python3.12)" >&2
    exit 1
fi

start=$(date +%s)
echo "==> creating $VENV with $PY ($("$PY" --version 2>&1)) from $SOURCE_ID"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off)
"${PIP[@]}" --upgrade pip

if [[ -n "${APT_OPENPI_SRC:-}" ]]; then
    OPENPI="$(cd "$APT_OPENPI_SRC" && pwd)"
else
    mkdir -p "$SRC_DIR"
    tar -xzf "$SNAPSHOT" -C "$SRC_DIR"
    OPENPI="$SRC_DIR/openpi"
fi

# openpi's own dependency list minus what the PyTorch model and trainer never import on CPU:
# jax[cuda12] -> jax (CPU jaxlib; openpi.models.gemma imports jax/flax at module level),
# lerobot (openpi pins a git rev that PyPI does not have; only its LeRobot data configs use it),
# gym-aloha (examples only). The uv overrides (ml-dtypes, tensorstore) are applied as pins.
echo "==> installing openpi's PyTorch dependencies (torch 2.7.1, transformers 4.53.2, jax CPU; a few minutes)"
"${PIP[@]}" \
    "torch==2.7.1" "transformers==4.53.2" "jax==0.5.3" "jaxlib==0.5.3" "flax==0.10.2" \
    "orbax-checkpoint==0.11.13" "ml-dtypes==0.4.1" "tensorstore==0.1.74" "chex==0.1.90" \
    "jaxtyping==0.2.36" "beartype==0.19.0" "ml_collections==1.0.0" "numpy>=1.22.4,<2" \
    "augmax>=0.3.4" "dm-tree>=0.1.8" "einops>=0.8.0" "equinox>=0.11.8" "flatbuffers>=24.3.25" \
    "fsspec>=2024.6.0" "imageio>=2.36.1" "numpydantic>=1.6.6" "pillow>=11.0.0" "sentencepiece>=0.2.0" \
    "tqdm-loggable>=0.2" "typing-extensions>=4.12.2" "tyro>=0.9.5" "wandb>=0.19.1" "filelock>=3.16.1" \
    "treescope>=0.1.7" "rich>=14.0.0" "polars>=1.30.0" "msgpack>=1.0.5" "websockets>=11.0" \
    "opencv-python-headless>=4.10.0.84" \
    "peft>=0.15,<0.18" "pytest-xdist>=3.5" "pluggy>=1.5" "pydantic>=2.6" "safetensors>=0.4.3" "packaging>=23" "pyyaml>=6" "pytest>=8"
"${PIP[@]}" --no-deps -e "$OPENPI/packages/openpi-client" -e "$OPENPI"

# openpi's README: copy models_pytorch/transformers_replace over the installed transformers (adaRMS,
# precision control, KV cache without update; PI0Pytorch checks for it at construction).
TF_DIR="$("$VENV/bin/python" -c 'import os, transformers; print(os.path.dirname(transformers.__file__))')"
cp -r "$OPENPI/src/openpi/models_pytorch/transformers_replace/"* "$TF_DIR/"

"${PIP[@]}" --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import openpi.models_pytorch.pi0_pytorch, transformers.models.siglip.check as c; assert c.check_whether_transformers_replace_is_installed_correctly()"
fingerprint > "$STAMP"
echo "==> openpi environment ready: $VENV ($(( $(date +%s) - start )) s)"
