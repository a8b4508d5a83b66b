"""benchmarks/sampler_pick.py runs on the sampler as it is (its stand-in rows carry what ``Sampler.pick`` reads of a
request: the generator and its uniform draws), and its greedy rows pick the full pass's ids."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_sampler_pick_runs_and_its_greedy_rows_agree_with_the_full_pass():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampler_pick.py"), "--rows", "2", "--repeat", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"agent", "sampled"}
    assert rows["agent"][-1] == "yes" and rows["sampled"][-1] == "-"
    assert all(float(x) > 0 for row in rows.values() for x in row[1:3])
