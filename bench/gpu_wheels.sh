#!/usr/bin/env bash
# Wheels the device machine's image lacks (it reaches no registry), for `carry: [".whl"]` and
# bench/gpu_session.sh, which installs them there: nibabel (ldmfast's data), monai and diffusers
# (bench_accelerate's peers) and what those need beyond the image's packages (importlib-metadata,
# lazy-importer). Run here, in the repository root; .whl/ stays out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl nibabel monai diffusers importlib-metadata lazy-importer
ls -1 .whl
