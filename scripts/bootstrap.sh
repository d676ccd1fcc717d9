#!/usr/bin/env bash
# Create .venv at the repository root with Python 3.12 and install apt-plugins with its LeRobot
# extra. Idempotent: an environment built from the same pyproject.toml and this script is reused;
# anything else is rebuilt from scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.apt-plugins-stamp"

is_312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
    local candidates=()
    [[ -n "${APT_PYTHON:-}" ]] && candidates+=("$APT_PYTHON")
    command -v python3.12 >/dev/null 2>&1 && candidates+=("$(command -v python3.12)")
    if command -v pyenv >/dev/null 2>&1; then
        local root; root="$(pyenv root)"
        for d in "$root"/versions/3.12*; do [[ -x "$d/bin/python" ]] && candidates+=("$d/bin/python"); done
    fi
    for d in "$HOME"/.pyenv/versions/3.12*; do [[ -x "$d/bin/python" ]] && candidates+=("$d/bin/python"); done
    command -v uv >/dev/null 2>&1 && candidates+=("$(uv python find 3.12 2>/dev/null || true)")
    candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12 python3)
    for c in "${candidates[@]}"; do
        [[ -n "$c" ]] && is_312 "$c" && { echo "$c"; return 0; }
    done
    return 1
}

fingerprint() {
    cat "$ROOT/pyproject.toml" "$ROOT/adapters/lerobot_policy_apt/pyproject.toml" "$ROOT/scripts/bootstrap.sh" \
        | sha256sum | cut -d' ' -f1
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]] && is_312 "$VENV/bin/python"; then
    exit 0
fi

if ! PY="$(find_python)"; then
    cat >&2 <<'MSG'
error: no Python 3.12 interpreter found. LeRobot 0.6.1, the host apt-plugins is tested against, needs
Python 3.12. Install one and run this again, for example:
    pyenv install 3.12          (then it is found under $(pyenv root)/versions/3.12.*)
    uv python install 3.12
    apt-get install python3.12 python3.12-venv
or point APT_PYTHON at a 3.12 interpreter: APT_PYTHON=/path/to/python3.12 make test
MSG
    exit 1
fi

echo "==> creating $VENV with $PY ($("$PY" --version 2>&1))"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "==> installing apt-plugins[lerobot,groot,deepspeed,demo,test] and the lerobot_policy_apt shim (pulls torch and LeRobot 0.6.1; a few minutes on a fresh machine)"
# The shim is a second distribution named lerobot_policy_apt: LeRobot auto-imports it, so the APT
# policy types work in lerobot-train/lerobot-eval without any --policy.discover_packages_path flag.
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e "$ROOT[lerobot,groot,deepspeed,demo,test]" -e "$ROOT/adapters/lerobot_policy_apt"
fingerprint > "$STAMP"
echo "==> environment ready: $VENV"
