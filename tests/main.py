"""`make test`'s entry point: pytest, then an exit that skips the interpreter's own teardown.

One CI run printed its whole summary (every test reported) and then died with SIGSEGV: the
test-runner process holds Ray, vLLM, torch, DeepSpeed and gloo state from hundreds of tests, and one
of their C-level teardowns crashed after `pytest.main` had returned (no test, no product process was
involved; faulthandler is already off by then, so it left no trace). The exit status is pytest's
own, taken after its summary, cleanups and `.pytest-tiers.json`; only what follows is skipped.
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.getcwd()  # as `python -m pytest` has it: the working directory, not tests/

import pytest  # noqa: E402

if __name__ == "__main__":
    code = int(pytest.main(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
