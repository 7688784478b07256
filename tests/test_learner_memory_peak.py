"""`DeviceProfile.peak_memory_mb` (the learner's `peak_mem_mb` step metric) on CPU: the resident
high-water mark since `reset_peak_memory`, which a reset brings back down."""
import torch

from contract.devices import DeviceProfile


def test_peak_memory_is_this_windows_resident_peak():
    cpu = DeviceProfile("cpu")
    cpu.reset_peak_memory()
    base = cpu.peak_memory_mb()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert cpu.peak_memory_mb() >= base + 60
    del block
    cpu.reset_peak_memory()
    assert 0 < cpu.peak_memory_mb() < base + 40
