#!/bin/bash
# Runs the gpu tests of tests/test_cuda.py without a GPU, against a host emulation of regrad._cuda
# (docs/cuda.md, "Without a GPU"). Needs g++ with C++20 (std::barrier) and the dev venv
# (make test builds it). Usage: bash tools/cuda_emulation/run.sh [pytest args]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/cuda-emulation; rm -rf "$OUT"; mkdir -p "$OUT/src" "$OUT/obj" "$OUT/lib" "$OUT/tests"
for f in numerical regularizers runtime; do "$PY" "$HERE/translate.py" "$ROOT/src/cpp/cuda/$f.cu" "$OUT/src/$f.cpp"; done
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
PBI=$("$PY" -c "import pybind11; print(pybind11.get_include())")
# -ffp-contract=off stands in for the CUDA build's --fmad=false
FLAGS=(-std=c++20 -O1 -fPIC -ffp-contract=off -Wno-psabi -I "$HERE/include" -I "$ROOT/src/cpp/cuda"
       -I "$ROOT/src/cpp/include" -I "$PYINC" -I "$PBI")
pids=()
for f in numerical regularizers runtime; do g++ "${FLAGS[@]}" -x c++ -c "$OUT/src/$f.cpp" -o "$OUT/obj/$f.o" & pids+=($!); done
g++ "${FLAGS[@]}" -c "$ROOT/src/cpp/cuda/bind_cuda.cpp" -o "$OUT/obj/bind.o" & pids+=($!)
for f in "$ROOT"/src/cpp/core/*.cpp; do g++ "${FLAGS[@]}" -c "$f" -o "$OUT/obj/core_$(basename "$f" .cpp).o" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
g++ -shared -o "$OUT/lib/_cuda$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")" "$OUT"/obj/*.o -lpthread
# The suite's GPU tests as they are, but for the two lines that ask for a real device.
sed -e 's/^HAVE_GPU = .*/HAVE_GPU = True/' \
    -e 's/^\( *\)assert gpu.value.device.type == "cuda" and gpu.grads\[0\].device.type == "cuda"/\1pass  # emulation: CPU tensors/' \
    "$ROOT/tests/test_cuda.py" > "$OUT/tests/test_cuda_emulated.py"
grep -q '^HAVE_GPU = True' "$OUT/tests/test_cuda_emulated.py"
cp "$HERE/conftest.py" "$OUT/tests/conftest.py"
cp "$ROOT/tests/conftest.py" "$OUT/tests/conftest_tests.py"
printf '[pytest]\nmarkers =\n    gpu: run against the emulation\n    slow: slow\n' > "$OUT/tests/pytest.ini"
cd "$OUT/tests"
REGRAD_TESTS="$ROOT/tests" REGRAD_EMU_LIB="$OUT/lib" "$PY" -m pytest -c pytest.ini -p no:cacheprovider -q -m gpu \
    test_cuda_emulated.py "$@"
