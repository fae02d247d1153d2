#!/usr/bin/env bash
# Rebuild the training corpus from scratch, using only Debian packages and PyPI:
#   - sword-text-web      (World English Bible, public domain; installed with apt-get)
#   - r-cran-janeaustenr  (Jane Austen's novels, public domain texts; fetched with
#                          `apt-get download` by models/corpus.py, never installed, no R needed)
#   - rdata               (PyPI; reads the R lazy-load data base in that package)
# Usage: scripts/build_corpus.sh [OUT_DIR]   (default data/corpus). Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-data/corpus}"
PY="${PYTHON:-.venv/bin/python}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends sword-text-web
# models/__init__ imports torch, so the project venv (make install) runs the builder.
if [ ! -x "$PY" ]; then make install; PY=.venv/bin/python; fi
"$PY" -m pip install -q rdata
"$PY" -m models.corpus "$OUT"
