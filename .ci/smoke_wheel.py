"""Smoke check of an installed wheel, run from outside the source tree: import, build_info, one kernel."""

import os

import numpy as np

import regrad

assert "site-packages" in regrad.__file__, f"imported regrad from {regrad.__file__}, not the installed wheel"
assert not os.path.exists(os.path.join(os.getcwd(), "src", "python", "regrad"))
info = regrad.build_info()
print("build_info:", info)
assert info["version"] == regrad.__version__

rng = np.random.default_rng(0)
x = [rng.normal(size=n) for n in (7, 300, 1)]
res = regrad.kernels.l1(x)
expected = np.mean([np.abs(a).sum() for a in x])
assert abs(res.value - expected) <= 1e-12 * expected, (res.value, expected)
for g, a in zip(res.grads, x):
    np.testing.assert_array_equal(g, np.sign(a) / len(x))
print("wheel smoke check: l1 matches numpy")

# the console script without torch: `regrad check` of a built-in against its analytic gradient
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

script = os.path.join(os.path.dirname(sys.executable), "regrad")
done = subprocess.run([script, "check", "l2", "--top-k", "3", "--json"], capture_output=True, text=True, timeout=300)
assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
report = json.loads(done.stdout)
assert report["passed"] and report["against"] == "the analytic gradient of l2" and max(report["max_rel_error"]) < 1e-6
print("wheel smoke check: regrad check l2 passes without torch")
