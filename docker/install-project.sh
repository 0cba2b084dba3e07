#!/bin/sh
# Inside an image build, in /opt/project, into /opt/venv:
#   install-project.sh deps LOCK [TORCH_INDEX_URL]   the locked dependencies (requirements/LOCK):
#                                                    image.txt / image-gpu.txt the Triton models' runtime,
#                                                    image-adapter.txt the adapter's (no torch)
#   install-project.sh tritonserver                  the locked nvidia-pytriton wheel (the server), no deps
#   install-project.sh project                       the project itself, editable, no deps (after its sources)
# The locks are resolved for CPython 3.11 (`make lock`): there they install with every hash checked.
# On another Python (an NGC base image brings its own) the lock's versions become constraints on
# pyproject.toml's ranges and pip fills in what that Python needs more.
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
locked_python=$(/opt/venv/bin/python -c 'import sys; print(sys.version_info[:2] == (3, 11))')
case "$1" in
deps)
    lock=requirements/$2
    torch_index=${3:-}
    # A lock that pins torch (image.txt) or leaves it to the image (image-gpu.txt: uv lists it under
    # "excluded from the output") is the runtime's; image-adapter.txt has no torch at all.
    if grep -q -e '^torch==' -e '^# torch$' "$lock"; then project=".[runtime]"; else project="."; fi
    # image-gpu.txt leaves torch (and its triton) to the image; one that has none takes it from
    # TORCH_INDEX_URL (or the index) first, as the locked packages that need torch expect it there.
    if grep -q '^# torch$' "$lock" && ! /opt/venv/bin/python -c 'import torch' 2>/dev/null; then
        pip ${torch_index:+--extra-index-url "$torch_index"} torch
    fi
    if [ "$locked_python" = True ]; then
        pip --require-hashes -r "$lock" ${torch_index:+--extra-index-url "$torch_index"}
    else
        sed -e '/^ *--hash/d' -e '/^ *#/d' -e 's/ *\\$//' -e '/^torch==/d' -e '/^triton==/d' "$lock" \
            > /tmp/lock-constraints.txt
        # The project's own requirements (it has no sources in this layer yet: `project` installs them).
        pip -c /tmp/lock-constraints.txt "setuptools>=70.1" "$project" ${torch_index:+--extra-index-url "$torch_index"}
    fi ;;
tritonserver)
    pip --no-deps --require-hashes -r requirements/tritonserver.txt ;;
project)
    pip --no-deps --no-build-isolation -e . ;;
*)
    echo "usage: install-project.sh deps LOCK [TORCH_INDEX_URL] | tritonserver | project" >&2
    exit 2 ;;
esac
