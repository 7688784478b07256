"""What a RESULTS file says about where its figures came from (benchmarks/provenance.py)."""
from __future__ import annotations

import subprocess

from benchmarks.provenance import cpu_line, git_commit


def test_a_benchmarks_own_results_do_not_mark_the_commit_dirty_but_code_changes_do(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS_x.md").write_text("old figures\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "benchmarks" / "RESULTS_x.md").write_text("new figures, written by the running benchmark\n")
    assert git_commit(tmp_path) == head  # was head+dirty: rows 2-8 of a learning table said so
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}+dirty"
    assert git_commit(tmp_path / "benchmarks" / "nowhere") == "unknown"


def test_the_cpu_line_names_the_model_the_cores_and_the_vector_flags():
    line = cpu_line()
    assert " cores, flags: " in line and line.split(",")[0].strip()
