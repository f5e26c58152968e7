"""What a distributor gets: the sdist holds what the build and the wheel need (and no build output), the
wheel holds the typing files and the license. Usage: check_dists.py SDIST WHEEL."""

import sys
import tarfile
import zipfile

sdist_path, wheel_path = sys.argv[1:3]
with tarfile.open(sdist_path) as tar:
    names = tar.getnames()
    top = names[0].split("/")[0]
    sdist = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    large = [m.name for m in tar.getmembers() if m.size > 1_000_000]
needed = ["PKG-INFO", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE",
          "src/cpp/include/regrad/formulas.hpp", "src/cpp/bindings/module.cpp", "src/cpp/core/kernels.cpp",
          "src/cpp/cuda/bind_cuda.cpp", "src/python/regrad/py.typed", "src/python/regrad/_core.pyi",
          "src/python/regrad/_cuda.pyi"]
missing = [n for n in needed if n not in sdist]
assert not missing, f"the sdist lacks {missing}"
stray = sorted(n for n in sdist if n.split("/")[0] in ("build", "dist", ".venv", ".git")
               or "__pycache__" in n or n.endswith((".so", ".pyc")))
assert not stray and not large, f"the sdist holds build output or large files: {stray[:5]} {large}"
print(f"sdist: {len(sdist)} files, the build's sources and the license included, no build output")

with zipfile.ZipFile(wheel_path) as whl:
    wheel = set(whl.namelist())
needed = ["regrad/py.typed", "regrad/_core.pyi", "regrad/_cuda.pyi", "regrad/__init__.py", "regrad/bench/__init__.py",
          "regrad/_demo_corpus.py"]
missing = [n for n in needed if n not in wheel]
missing += [] if any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel) else ["dist-info/licenses/LICENSE"]
missing += [] if any(n.startswith("regrad/_core.") and n.endswith(".so") for n in wheel) else ["regrad/_core*.so"]
assert not missing, f"the wheel lacks {missing}"
print(f"wheel: {len(wheel)} files, py.typed, the stubs, the compiled core and the license included")
