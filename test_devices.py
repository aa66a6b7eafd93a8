"""
Devices, without a GPU: device=auto and dtype=auto choose as the README says, each mistake is one line naming it,
and the MFU table knows a GPU's peak or says nothing:  python3 -m pytest -q test_devices.py
"""
import re

import pytest
import torch

import device
from configurator import ConfigError


@pytest.mark.parametrize("requested, local_rank, cuda_count, mps, expected", [
    ("auto", None, 0, False, "cpu"),
    ("auto", None, 2, False, "cuda:0"),  # "cuda" is the current device: a bare torch.device("cuda") breaks set_device
    ("cuda", None, 1, False, "cuda:0"),
    ("cuda:1", None, 2, False, "cuda:1"),
    ("cuda", 3, 4, False, "cuda:3"),  # under torchrun each rank takes its LOCAL_RANK's GPU
    ("auto", 1, 2, False, "cuda:1"),
    ("cpu", 1, 2, False, "cpu"),
    ("mps", None, 0, True, "mps"),
    ("cuda", None, 0, False, "device=cuda but CUDA is not available on this machine"),
    ("cuda:2", None, 2, False, "device=cuda:2 but this machine has 2 GPU(s): cuda:0 to cuda:1"),
    ("cuda:1", 0, 2, False, "device=cuda:1: under torchrun each rank takes the GPU of its LOCAL_RANK"),
    ("cuda", 2, 2, False, "LOCAL_RANK=2 but this machine has 2 GPU(s)"),
    ("mps", None, 0, False, "device=mps but MPS is not available"),
    ("mps", 0, 0, True, "device=mps cannot run under torchrun"),
    ("cuda:x", None, 1, False, "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    ("cpu:0", None, 1, False, "device must be auto, cpu, cuda, cuda:N or mps, got 'cpu:0'"),
])
def test_device_resolution_covers_every_case_without_a_gpu(requested, local_rank, cuda_count, mps, expected):
    if re.fullmatch(r"cpu|mps|cuda:\d", expected):
        assert device.resolve_device(requested, local_rank, cuda_count, mps) == torch.device(expected)
    else:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            device.resolve_device(requested, local_rank, cuda_count, mps)


def test_dtype_auto_and_the_mfu_table():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert device.resolve_dtype("auto", cuda, True) == "bfloat16"
    assert device.resolve_dtype("auto", cuda, False) == "float16"  # with the GradScaler, as nanoGPT does
    assert device.resolve_dtype("auto", cpu, False) == "float32"
    assert device.resolve_dtype("float16", cpu, False) == "float16"
    with pytest.raises(ConfigError, match="dtype=bfloat16 but this GPU does not support it"):
        device.resolve_dtype("bfloat16", cuda, False)
    peak = lambda name: device.peak_flops(cuda, name)
    assert peak("NVIDIA H100 80GB HBM3") == 989e12 and peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA A100-SXM4-80GB") == 312e12 and peak("NVIDIA H200") == 989e12
    assert peak("NVIDIA L40S") == 362e12 and peak("NVIDIA L4") == 121e12 and device.peak_flops(cpu) is None
    for unknown in ("NVIDIA A10G", "NVIDIA GeForce GTX 1080", "AMD Instinct MI300X", ""):
        assert peak(unknown) is None  # MFU prints n/a, never another GPU's figure
