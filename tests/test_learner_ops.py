"""learner/ops.py: a rank's DeepSpeed init compiles nothing (it once compiled an op training never uses)."""
import torch.utils.cpp_extension as cpp_extension


def test_after_skip_shm_op_the_backend_builds_no_op_and_compiles_nothing(monkeypatch, tmp_path):
    import importlib

    from learner import ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch

    compiled = []
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: compiled.append(k.get("name")))  # would compile
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    ops.skip_shm_op()
    assert ds_torch.build_shm_op() is None
    assert compiled == [] and not any(tmp_path.iterdir())
