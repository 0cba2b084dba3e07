#!/bin/sh
# Inside an image build, in /opt/project:
#   install-project.sh EXTRAS [TORCH_INDEX_URL]  the project's dependencies (and EXTRAS) into /opt/venv, editable
#   install-project.sh --no-deps PACKAGE...      more packages
# With wheels in /opt/wheels (an offline build) pip uses them and no index at all.
set -eu
if [ ! -x /opt/venv/bin/python ]; then
    # Ubuntu-based images (NGC) ship python3 without ensurepip until python3-venv is installed.
    python3 -m venv /opt/venv 2>/dev/null || {
        apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
        python3 -m venv /opt/venv
    }
fi
if ls /opt/wheels/*.whl >/dev/null 2>&1; then
    pip() { /opt/venv/bin/pip install --no-index --find-links /opt/wheels "$@"; }
else
    pip() { /opt/venv/bin/pip install "$@"; }
fi
if [ "$1" = --no-deps ]; then
    pip "$@"
    exit
fi
extras=$1
torch_index=${2:-}
# Editable installs need setuptools >= 64 (PEP 660) and its own bdist_wheel (>= 70.1); venvs
# bundle older ones.
pip "setuptools>=70.1"
if [ -n "$torch_index" ]; then pip --index-url "$torch_index" torch; fi
# The packages' folders exist before their sources are copied in (a later layer), so this
# dependency layer stays cached while the code changes; the editable install points at them.
for package in adapter model_runtime kernels benchmarks; do
    mkdir -p "$package" && touch "$package/__init__.py"
done
pip --no-build-isolation -e ".${extras:+[$extras]}"
# The Triton stub imports from this venv and ignores PYTHONPATH: model.py files find the project
# through this .pth (as `make install` does).
/opt/venv/bin/python -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'project_root.pth').write_text('/opt/project\n')"
