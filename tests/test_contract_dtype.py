"""The compute dtype chosen by measurement (contract/dtype_choice.py, DeviceProfile.compute_dtype),
its cache per box, and `auto` in a job config resolved once into both the engine and learner sections.

Tests that need a known choice plant a cache entry for this box (a "planted" record, as a box with
fast bfloat16 would have measured) in a temporary cache directory; the real measurement is run too.
"""
import json

import pytest

from contract import dtype_choice as dc
from contract import devices
from contract.devices import DeviceProfile

X86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  7B13 64-Core Processor\n"
       "flags\t\t: fpu sse2 avx avx2 fma\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16 i8mm sve\nCPU implementer\t: 0x41\n"


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A private cache directory, and no choice remembered by this process before or after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    devices._dtype_choice.cache_clear()
    yield tmp_path / "rlhf-actor-learner" / "dtype.json"
    devices._dtype_choice.cache_clear()


def plant(path, dtype: str) -> dc.DtypeChoice:
    """Record `dtype` as this box's measured choice (a planted record: what another box would measure)."""
    import torch

    cpu, flags = dc.read_cpu_identity()
    planted = dc.DtypeChoice(dtype, "measured", cpu, flags, torch.__version__, 0.010, 0.004, 2)
    dc.save_cached(path, dc.cache_key(cpu, flags, torch.__version__), planted)
    return planted


@pytest.mark.parametrize("fp32_s, bf16_s, want", [
    (1.0, 0.5, "bfloat16"),   # 2x faster
    (1.2, 1.0, "bfloat16"),   # exactly the margin
    (1.0, 0.9, "float32"),    # 1.11x: inside noise, not worth bf16's rounding
    (1.0, 1.0, "float32"),
    (0.0058, 0.035, "float32"),  # an AVX2-only EPYC: bf16 0.17x
])
def test_bf16_only_when_faster_by_the_margin(fp32_s, bf16_s, want):
    assert dc.choose_dtype(fp32_s, bf16_s) == want
    assert dc.choose_dtype(1.0, 0.9, margin=1.1) == "bfloat16"
    with pytest.raises(ValueError, match="positive"):
        dc.choose_dtype(0.0, 1.0)


def test_cpu_identity_reads_model_and_bf16_flags():
    assert dc.cpu_identity(X86) == ("AMD EPYC 7B13 64-Core Processor", ("avx2",))
    assert dc.cpu_identity(SAPPHIRE) == ("Intel(R) Xeon(R) Platinum 8480+",
                                         ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))
    _, arm_flags = dc.cpu_identity(ARM)
    assert arm_flags == ("asimd", "bf16", "sve", "i8mm")
    c = dc.DtypeChoice("float32", "measured", "AMD EPYC", ("avx2",), "2.13", 0.006, 0.03, 2)
    assert c.summary() == "float32 (bf16 0.20x fp32 on AMD EPYC, avx2 only; measured)"
    b = dc.DtypeChoice("bfloat16", "cached", "Xeon", ("avx2", "avx512f", "amx_bf16"), "2.13", 0.01, 0.004, 2)
    assert b.summary() == "bfloat16 (bf16 2.50x fp32 on Xeon, avx512f+amx_bf16; cached)"


def test_cache_round_trip_is_keyed_by_cpu_flags_and_torch(tmp_path):
    path = tmp_path / "sub" / "dtype.json"
    amd = dc.DtypeChoice("float32", "measured", "AMD EPYC", ("avx2",), "2.13.0", 0.006, 0.03, 2)
    xeon = dc.DtypeChoice("bfloat16", "measured", "Xeon 8480+", ("avx2", "amx_bf16"), "2.13.0", 0.01, 0.004, 2)
    k_amd, k_xeon = dc.cache_key("AMD EPYC", ("avx2",), "2.13.0"), dc.cache_key("Xeon 8480+", ("avx2", "amx_bf16"),
                                                                               "2.13.0")
    assert dc.load_cached(path, k_amd) is None  # no file yet
    dc.save_cached(path, k_amd, amd)
    dc.save_cached(path, k_xeon, xeon)
    assert dc.load_cached(path, k_amd) == dc.DtypeChoice(**{**amd.__dict__, "how": "cached"})
    assert dc.load_cached(path, k_xeon).dtype == "bfloat16"
    # another torch, or the same model name with other flags (a VM hiding AMX), is another box
    assert dc.load_cached(path, dc.cache_key("AMD EPYC", ("avx2",), "2.14.0")) is None
    assert dc.load_cached(path, dc.cache_key("Xeon 8480+", ("avx2",), "2.13.0")) is None
    assert sorted(json.loads(path.read_text())) == sorted([k_amd, k_xeon])
    path.write_text("{not json")  # a damaged cache is measured again and rewritten, not an error
    assert dc.load_cached(path, k_amd) is None
    dc.save_cached(path, k_amd, amd)
    assert dc.load_cached(path, k_amd).fp32_s == pytest.approx(0.006)


def test_real_measurement_chooses_one_of_the_two_and_is_kept_per_box(cache_home):
    measured = dc.measure_cpu()
    assert measured.dtype in ("float32", "bfloat16") and measured.how == "measured"
    assert measured.fp32_s > 0 and measured.bf16_s > 0 and measured.device and measured.threads >= 1
    assert measured.dtype == dc.choose_dtype(measured.fp32_s, measured.bf16_s)

    cpu = DeviceProfile("cpu")
    first = cpu.dtype_choice()  # measured now, written to the cache file
    assert first.how == "measured" and cpu.compute_dtype() == first.dtype
    key = dc.cache_key(first.device, first.flags, first.torch)
    assert list(json.loads(cache_home.read_text())) == [key]
    devices._dtype_choice.cache_clear()  # a new process on the same box reads it instead of measuring
    again = cpu.dtype_choice()
    assert again.how == "cached" and (again.dtype, again.fp32_s, again.bf16_s) == (first.dtype, first.fp32_s,
                                                                                   first.bf16_s)


def job(engine: str, learner: str):
    from cluster.config import load_config

    base = {"model": {"policy": "m"}, "data": {"prompts": "p"}, "reward": {"model_dir": "r"}}
    return load_config(None, [f"rollout.engine.dtype={engine}", f"learner.dtype={learner}"], base=base)


def test_auto_resolves_once_into_both_sections(cache_home):
    from cluster.config import dump_config
    from cluster.job.dtypes import resolve_job_dtypes

    planted = plant(cache_home, "bfloat16")
    cfg = job("auto", "auto")
    resolved, line = resolve_job_dtypes(cfg, DeviceProfile("cpu"))
    assert (resolved.rollout.engine.dtype, resolved.learner.dtype) == ("bfloat16", "bfloat16")
    assert (cfg.rollout.engine.dtype, cfg.learner.dtype) == ("auto", "auto")  # the caller's config untouched
    assert line == f"dtype: bfloat16 (bf16 2.50x fp32 on {planted.device}, {planted.flags_text()}; cached)"
    dumped = dump_config(resolved)  # what the run's config.yaml keeps
    assert "dtype: auto" not in dumped and dumped.count("dtype: bfloat16") == 2
    again, _ = resolve_job_dtypes(resolved, DeviceProfile("cpu"))
    assert again is resolved  # nothing left to resolve: the services get it as it is

    mixed, line = resolve_job_dtypes(job("auto", "float32"), DeviceProfile("cpu"))
    assert (mixed.rollout.engine.dtype, mixed.learner.dtype) == ("bfloat16", "float32")
    assert line.endswith("; engine bfloat16, learner float32")
    fixed = job("float32", "float32")
    same, line = resolve_job_dtypes(fixed, DeviceProfile("cpu"))
    assert same is fixed and line == "dtype: engine float32, learner float32 (set in the config)"


def test_defaults_stay_float32_whatever_the_box_measures(cache_home):
    """The tiny demo and the logprob-agreement tests rely on float32 unless a config says auto."""
    from actors.config import EngineConfig
    from learner.config import LearnerConfig

    plant(cache_home, "bfloat16")
    assert EngineConfig().dtype == "float32" and LearnerConfig().dtype == "float32"
    from cluster.job.dtypes import resolve_job_dtypes

    cfg = job("float32", "float32")
    assert resolve_job_dtypes(cfg, DeviceProfile("cpu"))[0].learner.dtype == "float32"


@pytest.mark.component  # starts vLLM engines
def test_engine_and_generate_auto_use_the_device_choice(cache_home, tiny_models, capsys):
    """RolloutEngine given `auto` directly, and `rlhf generate --dtype auto`, run at the device's choice
    (planted bfloat16 here), not at the dtype the model was saved in (float32)."""
    import torch

    from actors.config import EngineConfig
    from actors.engine import RolloutEngine
    from cluster.launch.generate import generate_command

    plant(cache_home, "bfloat16")
    engine = RolloutEngine(str(tiny_models["policy"]), EngineConfig(dtype="auto", max_model_len=128,
                                                                    kv_cache_bytes=16 << 20), DeviceProfile("cpu"))
    assert engine.cfg.dtype == "bfloat16"
    assert engine.llm.llm_engine.model_config.dtype == torch.bfloat16
    del engine
    assert generate_command(str(tiny_models["policy"]), "red green", max_new_tokens=4, dtype="auto",
                            max_model_len=128, quiet=True) == 0
    out = capsys.readouterr().out
    assert "rlhf generate: dtype: bfloat16 (bf16 2.50x fp32" in out and "rlhf generate: 1 samples" in out
