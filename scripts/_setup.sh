# Sourced by scripts/demo, scripts/test and scripts/gpu_check: make .venv ready, idempotently.
# Fast when already set up: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.spfl-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1 and spfl_vmap[dev] (first run only)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # --no-compile: byte-compiling all of torch costs about a minute; imports compile what they use
  "$VENV/bin/python" -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q --no-compile -e ".[dev]"
  echo "$want" > "$STAMP"
fi
# Byte-compile the venv once: the install skips it (--no-compile) and this machine sets
# PYTHONDONTWRITEBYTECODE, so without it every process compiles the torch sources it imports
# (measured: the first make_fx trace, which imports torch._dynamo, 4.1 s -> 1.1 s; ~35 s once).
if [ ! -f "$VENV/.spfl-compiled" ] || [ "$(cat "$VENV/.spfl-compiled")" != "$want" ]; then
  echo "[setup] byte-compiling the venv (once)"
  "$VENV/bin/python" -m compileall -q -j 0 "$VENV"/lib/python3*/site-packages >/dev/null 2>&1 || true
  echo "$want" > "$VENV/.spfl-compiled"
fi
export PATH="$VENV/bin:$PATH"

# The embedded default dataset: Debian's FashionMNIST (real 60k/10k IDX files).
ensure_fashion_mnist() {
  local d=/usr/share/datasets/fashion-mnist
  if [ -f "$d/train-images-idx3-ubyte.gz" ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "[setup] could not install dataset-fashion-mnist; FashionMNIST runs need --data_dir or --download"
  else
    echo "[setup] FashionMNIST missing and apt-get unavailable (run as root: apt-get install dataset-fashion-mnist)"
  fi
}
