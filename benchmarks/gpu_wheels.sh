#!/usr/bin/env bash
# Wheels of the packages kdlab imports that the device machine's image lacks, for its
# Python (3.12, x86-64), into .whl/ at the repository root (git-ignored), at the versions
# installed here (the ones the tests run against). Run it here, where PyPI is reachable;
# the device reaches no network. benchmarks/README.md has the device command that
# installs them there.
#
#   bash benchmarks/gpu_wheels.sh            # needs the project's environment active
#
# transformers is brought too, although the image has one, so that the benchmark runs on
# the version kdlab is tested with. antlr4-python3-runtime (Hydra's and OmegaConf's
# parser) is published as a source archive only: it is built into a wheel here (pure
# Python, so the wheel fits any Python 3).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"

pin() { python -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"; }

binary=()
for name in hydra-core omegaconf datasets dill multiprocess transformers; do
    binary+=("$(pin "$name")")
done
python -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    "${binary[@]}"
python -m pip wheel --quiet --no-deps --wheel-dir "$dest" "$(pin antlr4-python3-runtime)"
ls -l "$dest"
du -sh "$dest"
