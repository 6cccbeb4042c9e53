"""Hardware specs the planner estimates against: memory, flops, bandwidths.

Numbers are vendor peak figures (dense, no sparsity). `mfu` is the fraction of peak flops a
well-tuned training step reaches on that machine, and `link_efficiency` the fraction of a
link's bandwidth a collective reaches: both are stated assumptions, not fitted to mopc's
measurements. `reserved_bytes` is device memory a process cannot use for tensors (CUDA
context, NCCL and allocator slack).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["HARDWARE", "HardwareSpec", "device_hardware", "hardware"]

GB = 10**9
GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class HardwareSpec:
    name: str
    device_memory_bytes: int
    """Memory of one device (HBM, or the host's RAM share of one rank on a CPU)."""
    peak_flops_fp32: float
    peak_flops_bf16: float
    hbm_bandwidth: float
    """Bytes/s of device memory."""
    intra_node_bandwidth: float
    """Bytes/s one rank sends to the others of its node (NVLink; shared memory on a CPU)."""
    inter_node_bandwidth: float
    """Bytes/s one rank sends to other nodes (its InfiniBand/RoCE NIC)."""
    devices_per_node: int
    host_memory_bytes_per_node: int
    host_device_bandwidth: float
    """Bytes/s between a device and host memory, per device (PCIe)."""
    mfu: float = 0.45
    link_efficiency: float = 0.7
    reserved_bytes: int = 0

    def link_bandwidth(self, group_size: int, spans_nodes: bool) -> float:
        if group_size <= 1:
            return float("inf")
        bandwidth = self.inter_node_bandwidth if spans_nodes else self.intra_node_bandwidth
        return bandwidth * self.link_efficiency

    def peak_flops(self, dtype: str) -> float:
        return self.peak_flops_bf16 if dtype == "bf16" else self.peak_flops_fp32


def _cpu_spec() -> HardwareSpec:
    """This machine: every rank a process on one host (gloo over shared memory)."""
    try:
        with open("/proc/meminfo") as f:
            total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        total = 8 * GiB
    cores = os.cpu_count() or 1
    return HardwareSpec(name="cpu", device_memory_bytes=total, peak_flops_fp32=cores * 50e9,
                        peak_flops_bf16=cores * 50e9, hbm_bandwidth=10e9, intra_node_bandwidth=2e9,
                        inter_node_bandwidth=2e9, devices_per_node=1 << 20, host_memory_bytes_per_node=total,
                        host_device_bandwidth=10e9, mfu=0.3, link_efficiency=1.0, reserved_bytes=0)


HARDWARE: dict[str, HardwareSpec] = {
    # H100 SXM5: 80 GB HBM3 at 3.35 TB/s, 67 TFLOP/s fp32 (no TF32), 989 TFLOP/s bf16,
    # NVLink 4 at 450 GB/s per direction, one 400 Gb/s NIC per GPU, PCIe Gen5 x16.
    "h100": HardwareSpec(name="h100", device_memory_bytes=80 * GB, peak_flops_fp32=67e12, peak_flops_bf16=989e12,
                         hbm_bandwidth=3.35e12, intra_node_bandwidth=450e9, inter_node_bandwidth=50e9,
                         devices_per_node=8, host_memory_bytes_per_node=2048 * GB, host_device_bandwidth=55e9,
                         reserved_bytes=4 * GiB),
    # H200 SXM: the H100's compute with 141 GB HBM3e at 4.8 TB/s.
    "h200": HardwareSpec(name="h200", device_memory_bytes=141 * GB, peak_flops_fp32=67e12, peak_flops_bf16=989e12,
                         hbm_bandwidth=4.8e12, intra_node_bandwidth=450e9, inter_node_bandwidth=50e9,
                         devices_per_node=8, host_memory_bytes_per_node=2048 * GB, host_device_bandwidth=55e9,
                         reserved_bytes=4 * GiB),
}


def hardware(name: str) -> HardwareSpec:
    if name == "cpu":
        return _cpu_spec()
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join([*HARDWARE, 'cpu'])}")
    return HARDWARE[name]


def device_hardware(device) -> HardwareSpec:
    """The spec of a device: `cpu`, or `h200` / `h100` by the CUDA device's name."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return hardware("cpu")
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""
    return hardware("h200" if "H200" in name else "h100")
