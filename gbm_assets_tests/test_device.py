"""Training device: the GPU (mixed precision where it pays) when TensorFlow sees one, else the CPU in float32."""

from __future__ import annotations

import pytest

from gbm_assets.models.device import GpuInfo, TrainingDevice, apply_device, cpu_cores, detect_device, select_device


@pytest.fixture
def tf_sees(monkeypatch):
    """Make TensorFlow report the given GPUs (GpuInfo list) to the device module."""
    import tensorflow as tf

    def fake(gpus: list[GpuInfo]):
        handles = [
            tf.config.PhysicalDevice(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in range(len(gpus))
        ]
        details = {
            h.name: {
                "device_name": g.name,
                **({"compute_capability": g.compute_capability} if g.compute_capability else {}),
            }
            for h, g in zip(handles, gpus, strict=False)
        }
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: handles if kind == "GPU" else [])
        monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details[device.name])

    return fake


@pytest.fixture
def keras_policy():
    """Restore Keras' global dtype policy after the test."""
    import keras

    before = keras.config.dtype_policy().name
    yield keras
    keras.config.set_dtype_policy(before)


def test_without_a_gpu_training_is_on_the_cpu_in_float32(tf_sees):
    tf_sees([])
    device = detect_device()
    assert device == TrainingDevice("CPU", f"{cpu_cores()} CPU cores", "float32", n_gpus=0)
    assert device.mlflow_params() == {
        "device": "CPU",
        "device_name": f"{cpu_cores()} CPU cores",
        "precision": "float32",
        "n_gpus": 0,
    }


def test_this_machine_without_cuda_detects_the_cpu():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible here: test_device's fakes cover the CPU case")
    assert detect_device().kind == "CPU" and detect_device().precision == "float32"


def test_a_visible_ampere_or_newer_gpu_trains_in_mixed_bfloat16(tf_sees):
    tf_sees([GpuInfo("NVIDIA H200", (9, 0)), GpuInfo("NVIDIA H200", (9, 0))])
    device = detect_device()
    assert device == TrainingDevice("GPU", "NVIDIA H200", "mixed_bfloat16", n_gpus=2)
    assert device.mlflow_params()["device"] == "GPU" and device.mlflow_params()["precision"] == "mixed_bfloat16"


@pytest.mark.parametrize(
    "capabilities, precision",
    [
        ([(8, 0)], "mixed_bfloat16"),  # A100: bfloat16 Tensor Cores
        ([(7, 5)], "float32"),  # T4: no bfloat16 Tensor Cores, and float16 would need loss scaling
        ([None], "float32"),  # unknown capability: the safe choice
        ([(9, 0), (7, 0)], "float32"),  # one old GPU among new ones
    ],
)
def test_mixed_precision_only_where_every_gpu_has_bfloat16_tensor_cores(capabilities, precision):
    device = select_device([GpuInfo(f"gpu{i}", c) for i, c in enumerate(capabilities)], n_cpu_cores=2)
    assert (device.kind, device.name, device.precision, device.n_gpus) == ("GPU", "gpu0", precision, len(capabilities))


def test_applying_a_device_sets_the_dtype_policy_of_models_built_after(keras_policy):
    keras = keras_policy
    apply_device(TrainingDevice("GPU", "NVIDIA H200", "mixed_bfloat16", n_gpus=1))
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    assert (layer.compute_dtype, layer.variable_dtype) == ("bfloat16", "float32")
    apply_device(select_device([], n_cpu_cores=2))
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    assert (layer.compute_dtype, layer.variable_dtype) == ("float32", "float32")
