"""Chips' public peak figures and the roofline time they give a program (docs/benchmarks.md,
"FLOPs, roofline time and MFU").

A program that does `flops` of matrix work and moves `bytes` through memory takes at least
max(flops / peak FLOP/s, bytes / memory bandwidth) on a chip; its model-FLOPs utilisation at
a time t is model FLOPs / (t x peak). The peaks are dense bf16 (no sparsity) per device as JAX
sees it (a v4 or v5p chip is one megacore device), from the vendors' pages named in `source`.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    flops: float  # peak dense bf16 FLOP/s
    bandwidth: float  # HBM bytes/s
    source: str


TPU_V4 = Chip("TPU v4", 275e12, 1200e9, "cloud.google.com/tpu/docs/v4")
TPU_V5E = Chip("TPU v5e", 197e12, 819e9, "cloud.google.com/tpu/docs/v5e")
TPU_V5P = Chip("TPU v5p", 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p")
TPU_V6E = Chip("TPU v6e", 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e")
H100_SXM = Chip("H100 SXM", 989e12, 3.35e12, "nvidia.com/en-us/data-center/h100 (datasheet)")
H100_PCIE = Chip("H100 PCIe", 756e12, 2.0e12, "nvidia.com/en-us/data-center/h100 (datasheet)")
H100_NVL = Chip("H100 NVL", 835e12, 3.9e12, "nvidia.com/en-us/data-center/h100 (datasheet)")
H200_SXM = Chip("H200 SXM", 989e12, 4.8e12, "nvidia.com/en-us/data-center/h200 (datasheet)")
H200_NVL = Chip("H200 NVL", 835e12, 4.8e12, "nvidia.com/en-us/data-center/h200 (datasheet)")
CHIPS = (TPU_V4, TPU_V5E, TPU_V5P, TPU_V6E, H100_SXM, H100_PCIE, H100_NVL, H200_SXM, H200_NVL)

# A libtpu topology's generation (the name before ':') and JAX's device_kind of each chip.
_TOPOLOGIES = {"v4": TPU_V4, "v5e": TPU_V5E, "v5litepod": TPU_V5E, "v5p": TPU_V5P,
               "v6e": TPU_V6E}
_DEVICE_KINDS = {"TPU v4": TPU_V4, "TPU v5 lite": TPU_V5E, "TPU v5e": TPU_V5E,
                 "TPU v5": TPU_V5P, "TPU v5p": TPU_V5P, "TPU v6 lite": TPU_V6E,
                 "TPU v6e": TPU_V6E}
# NVIDIA device kinds ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", ...): the first match wins.
_GPU_NAMES = (("H200 NVL", H200_NVL), ("H200", H200_SXM), ("H100 NVL", H100_NVL),
              ("H100 PCIe", H100_PCIE), ("H100", H100_SXM))


def chip_for(kind: str) -> Chip | None:
    """The chip of a JAX device_kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3") or a libtpu
    topology name ("v5e:2x4"); None for one without public figures here (a CPU)."""
    if kind in _DEVICE_KINDS:
        return _DEVICE_KINDS[kind]
    if ":" in kind:
        return _TOPOLOGIES.get(kind.split(":")[0])
    return next((chip for name, chip in _GPU_NAMES if name in kind), None)


def seconds(flops: float, bytes_moved: float, chip: Chip) -> float:
    """The roofline time: the longer of computing `flops` at peak and moving `bytes_moved`."""
    return max(flops / chip.flops, bytes_moved / chip.bandwidth)


def utilisation(model_flops: float, seconds_taken: float, chip: Chip) -> float:
    """Model-FLOPs utilisation of a program that does `model_flops` in `seconds_taken`."""
    return model_flops / (seconds_taken * chip.flops)
