#!/usr/bin/env bash
# FlashAttention-4 for the GPU machine, in three parts that each fit one device call beside the tree.
#
# The GPU image lacks flash-attn-4 and the CuTe DSL it compiles with. Their wheels are ~100 MB, the CuTe DSL's MLIR
# library alone 193 MB unpacked, and a call carries at most 64 MiB including the tree (~27 MB). This script downloads
# them, drops what a JIT-only user never loads (the QNX/aarch64 runtime stubs), recompresses with xz (~74 MB in all)
# and splits the bundle into .fa4p1/ .fa4p2/ .fa4p3/ (ignored by git), with .fa4p3/install.sh.
#
# On the device (one warm machine; the next call must follow within its 30 s idle release):
#   call 1, carry [".fa4p1"]:             mkdir -p /tmp/stash && cp .fa4p1/part.0 /tmp/stash/
#   call 2, carry [".fa4p2"]:             cp .fa4p2/part.1 /tmp/stash/
#   call 3, carry [".fa4p3", ".whl-lite"]: bash .fa4p3/install.sh && export \
#       PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD; ...
# (.whl-lite: the wheels of scripts/gpu_wheels.sh without `av`; install.sh installs .whl-lite/*.whl too.)
# While the machine stays warm, later calls need no carry: /tmp/site persists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --pre -d "$WORK/whl" \
  flash-attn-4==4.0.0b36 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir -p "$WORK/cu13" "$WORK/bundle/whl"
unzip -q -o "$WORK"/whl/nvidia_cutlass_dsl_libs_cu13-*.whl -d "$WORK/cu13"
rm "$WORK"/whl/nvidia_cutlass_dsl_libs_cu13-*.whl
mv "$WORK/cu13/nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so" "$WORK/runtime.so"
rm -rf "$WORK/cu13/nvidia_cutlass_dsl/cu13/lib/stubs" "$WORK"/cu13/*.dist-info
tar cf - -C "$WORK/cu13" nvidia_cutlass_dsl | xz -9e -T2 > "$WORK/bundle/cu13slim.tar.xz"
xz -9 -T2 -c "$WORK/runtime.so" > "$WORK/bundle/libcute_dsl_runtime.so.xz"
cp "$WORK"/whl/*.whl "$WORK/bundle/whl/"
tar cf "$WORK/bundle.tar" -C "$WORK/bundle" .
rm -rf .fa4p1 .fa4p2 .fa4p3 && mkdir .fa4p1 .fa4p2 .fa4p3
split -b 26800000 -d -a 1 "$WORK/bundle.tar" "$WORK/part."
mv "$WORK/part.0" .fa4p1/ && mv "$WORK/part.1" .fa4p2/ && mv "$WORK/part.2" .fa4p3/
for d in .fa4p1 .fa4p2 .fa4p3; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
cat > .fa4p3/install.sh <<'INSTALL'
set -e
mkdir -p /tmp/stash /tmp/fa4
cp .fa4p3/part.2 /tmp/stash/
cat /tmp/stash/part.0 /tmp/stash/part.1 /tmp/stash/part.2 > /tmp/fa4bundle.tar
tar xf /tmp/fa4bundle.tar -C /tmp/fa4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/fa4/whl/*.whl .whl-lite/*.whl
python3 -c "import tarfile; tarfile.open('/tmp/fa4/cu13slim.tar.xz').extractall('/tmp/site')"
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('/tmp/fa4/libcute_dsl_runtime.so.xz'), \
open('/tmp/site/nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so', 'wb'))"
INSTALL
du -sh .fa4p1 .fa4p2 .fa4p3
