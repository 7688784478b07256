"""learner/ops.py: a killed DeepSpeed op compile is a one-line error, not an endless wait."""
import os
import time

import pytest

from learner import ops


def test_a_stale_build_lock_is_named_and_a_fresh_one_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = ops.shm_builder().name
    lock = ops.build_dir(name) / "lock"
    assert lock.parent.is_relative_to(tmp_path)
    ops.refuse_stale_lock()  # no lock: nothing to say
    lock.write_text("")
    ops.refuse_stale_lock()  # a compile in progress: wait for it as torch does
    old = time.time() - ops.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(RuntimeError, match=rf"^{lock}: a DeepSpeed op build lock 16 min old .*python -m learner.ops"):
        ops.refuse_stale_lock()


def test_the_install_step_builds_the_op_and_clears_a_killed_builds_lock():
    where = ops.build_dir(ops.shm_builder().name)
    (where / "lock").touch()
    os.utime(where / "lock", (0, 0))
    assert ops.build() == where
    assert not (where / "lock").exists() and any(where.glob("deepspeed_shm_comm*.so"))
    ops.refuse_stale_lock()
