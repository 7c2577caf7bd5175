# Sourced by the bench/h200_*.sh scripts on the lent H200 (no package registry there):
#   . bench/h200_install.sh "WHEEL_DIR..." PACKAGE_DIR...
# installs the carried wheels (dsr1's pure-Python dependencies in .engine-whl, torchao in .ao-whl,
# pytest in .test-whl), then dsr1, the SDK and the named plugin dirs, into /tmp/site, and puts it on
# PYTHONPATH (the machine's torch, triton and transformers stay as they are).
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site"
wheels=()
for dir in $1; do wheels+=("$dir"/*.whl); done
$PIP --upgrade "${wheels[@]}"
shift
$PIP --no-build-isolation ./ ./sdk "$@" >/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
