"""Where training runs: the first visible GPU when TensorFlow sees one (the `gpu` extra), else the CPU.

`select_device` is the pure decision; `detect_device` asks TensorFlow what it sees, and
`use_training_device` also applies the decision (GPU memory growth, the Keras dtype policy) so that
models built afterwards use it.

Mixed precision where it pays: the Keras dtype policy "mixed_bfloat16" (variables float32,
computation bfloat16) when every visible GPU has compute capability 8.0 or more (NVIDIA Ampere and
newer, whose Tensor Cores run bfloat16). bfloat16 keeps float32's exponent range, so no loss scaling
is needed, which the custom Barlow Twins train_step does not do. Older GPUs and the CPU train in
float32 (on a CPU mixed precision is slower, not faster). Hide the GPUs with CUDA_VISIBLE_DEVICES=""
to train on the CPU anyway.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
BFLOAT16_TENSOR_CORES = (8, 0)  # the first compute capability with bfloat16 Tensor Cores (Ampere)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as TensorFlow reports it (tf.config.experimental.get_device_details)."""

    name: str  # e.g. "NVIDIA H200"; "GPU" when the driver gives none
    compute_capability: tuple[int, int] | None  # (major, minor); None when unknown


@dataclass(frozen=True)
class TrainingDevice:
    """The device a training run uses and the Keras dtype policy it trains with."""

    kind: str  # "GPU" or "CPU"
    name: str  # the GPU's name, or "<n> CPU cores"
    precision: str  # a Keras dtype policy name: "float32" or "mixed_bfloat16"
    n_gpus: int = 0  # GPUs visible (Keras' fit uses the first)

    def mlflow_params(self) -> dict[str, str | int]:
        """The run params that record it: device, device_name, precision, n_gpus."""
        return {"device": self.kind, "device_name": self.name, "precision": self.precision, "n_gpus": self.n_gpus}


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def select_device(gpus: Sequence[GpuInfo], n_cpu_cores: int) -> TrainingDevice:
    """The first GPU if any (mixed_bfloat16 when every GPU has compute capability >= 8.0), else the CPU in float32.

    A GPU of unknown compute capability trains in float32.
    """
    if not gpus:
        return TrainingDevice("CPU", f"{n_cpu_cores} CPU cores", FLOAT32)
    mixed = all(g.compute_capability is not None and tuple(g.compute_capability) >= BFLOAT16_TENSOR_CORES for g in gpus)
    return TrainingDevice("GPU", gpus[0].name, MIXED_BFLOAT16 if mixed else FLOAT32, n_gpus=len(gpus))


def visible_gpus() -> list[GpuInfo]:
    """The GPUs TensorFlow sees (none with tensorflow-cpu, without a driver, or with CUDA_VISIBLE_DEVICES="")."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(GpuInfo(details.get("device_name") or "GPU", tuple(capability) if capability else None))
    return gpus


def detect_device() -> TrainingDevice:
    """select_device for what this process sees; decides only, changes nothing."""
    return select_device(visible_gpus(), cpu_cores())


def apply_device(device: TrainingDevice) -> TrainingDevice:
    """Make Keras models built from now on use `device`'s dtype policy; let TensorFlow grow GPU memory as needed.

    Memory growth can only be set before TensorFlow first uses a GPU; later calls leave it as it is.
    Returns device.
    """
    import keras
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is already initialised
            pass
    keras.config.set_dtype_policy(device.precision)
    return device


def use_training_device() -> TrainingDevice:
    """detect_device, applied (apply_device): call before building the model to train."""
    return apply_device(detect_device())
