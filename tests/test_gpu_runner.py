"""tests/run_gpu.sh splits tests/test_kernels_gpu.py over several pytest processes by -k expressions: every test of
the file must fall in exactly one of them, or a renamed or added test (a new autotuned kernel, a new case) would
silently never run on the card, or run twice."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_TESTS = "tests/test_kernels_gpu.py"


def collect(*args: str) -> list[str]:
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          KERNEL_TESTS, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 5), run.stdout + run.stderr  # 5: nothing collected
    return [line for line in run.stdout.splitlines() if "::" in line]


def test_run_gpu_shards_run_every_kernel_test_once():
    script = (REPO / "tests" / "run_gpu.sh").read_text()
    variables = dict(re.findall(r'^(\w+)="([^"]*)"$', script, flags=re.M))
    shards = [re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], expr)
              for expr in re.findall(r'^run \w+ \$kernels -k "([^"]+)" &$', script, flags=re.M)]
    assert len(shards) >= 8, shards
    counts = Counter(test for expr in shards for test in collect("-k", expr))
    every = collect()
    assert len(every) >= 38
    assert sorted(counts) == sorted(every), set(every) ^ set(counts)
    assert all(n == 1 for n in counts.values()), [t for t, n in counts.items() if n > 1]
