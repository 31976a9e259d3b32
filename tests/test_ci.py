"""CI=true turns any skipped test into a failed run (tests/conftest.py), so a CI that forgot an
optional package fails instead of silently testing less. Checked on a throwaway test suite that
uses this very conftest."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT, SUBPROCESS_TIMEOUT

SUITE = '''
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason="no such package here")
def test_skipped_by_mark():
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("no_such_module_for_this_test")

def test_never_runs():
    pass
'''


def run_suite(tmp_path, files, ci):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)


def test_ci_fails_the_run_on_any_skip_and_names_it(tmp_path):
    files = {"test_a.py": SUITE, "test_b.py": MODULE_SKIP}
    r = run_suite(tmp_path, files, ci=False)
    assert r.returncode == 0, r.stdout                   # locally a skip is only a skip
    r = run_suite(tmp_path, files, ci=True)
    assert r.returncode == 1, r.stdout
    assert "CI=true: skipped tests fail the run" in r.stdout
    assert "SKIPPED test_a.py::test_skipped_by_mark: no such package here" in r.stdout
    assert "SKIPPED test_b.py" in r.stdout and "no_such_module_for_this_test" in r.stdout
    assert "test_expected_failure" not in r.stdout.split("skipped tests fail the run")[1]   # an xfail is no skip


def test_ci_passes_without_skips(tmp_path):
    r = run_suite(tmp_path, {"test_a.py": "def test_passes():\n    pass\n"}, ci=True)
    assert r.returncode == 0, r.stdout
