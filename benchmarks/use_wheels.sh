# Sourced by the GPU benchmark scripts. The lent GPU machines have no package index: packages come as wheels carried
# in a folder (.whl for flash-linear-attention, .whl/zero for DeepSpeed; bench_zero.sh says how they are built).
#
#   use_wheels MODULE FOLDER    # when MODULE does not import, install FOLDER/*.whl into /tmp/site and put it on PYTHONPATH
use_wheels() {
    if ! python3 -c "import $1" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$2"/*.whl || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
}
