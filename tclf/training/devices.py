"""Devices and precision of a training run: `--gpus`, `--cpu-devices` and `--precision`.

`--precision auto` is mixed_float16 on GPUs; on CPUs mixed_bfloat16 where the CPU computes
bfloat16 natively (AVX512-BF16 or AMX), float32 elsewhere. The model keeps its feature
normalization and softmax in float32 under every policy (tclf.model).
"""

from __future__ import annotations

import os
import re

from tclf import InputError
from tclf.training.cluster import make_strategy

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def configure_devices(gpus: str = "all", cpu_devices: int = 1, cluster=None,
                      worker_timeout: float = 600.0):
    """(strategy, description, on_gpu) for `--gpus` and `--cpu-devices`; must run before
    TensorFlow touches a device.

    ``gpus``: "all" (every visible GPU, mirrored; one GPU: that GPU; none: the CPU), "none"
    (the CPU) or indices like "0,1". ``cpu_devices`` > 1 splits the CPU into that many
    mirrored logical devices, to run the multi-device path without GPUs (not faster). With a
    ``cluster`` (tclf.training.cluster, from TF_CONFIG): MultiWorkerMirroredStrategy, each
    worker on the GPUs ``gpus`` picks (as many on each) or its CPU, every collective bounded
    by ``worker_timeout`` seconds. InputError for choices this machine cannot meet.
    """
    import tensorflow as tf

    if cpu_devices < 1:
        raise InputError(f"--cpu-devices must be >= 1, got {cpu_devices}")
    if cluster is not None:
        return _cluster_strategy(gpus, cpu_devices, cluster, worker_timeout)
    physical = tf.config.list_physical_devices("GPU")
    spec = str(gpus).strip().lower()
    if spec == "none":
        if physical:
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                raise InputError("--gpus none: TensorFlow already started in this process with "
                                 "its GPUs visible; choose the devices before anything else "
                                 "uses TensorFlow (a new process, or CUDA_VISIBLE_DEVICES='')"
                                 ) from None
        return _cpu_strategy(cpu_devices, "--gpus none")
    if spec == "all":
        chosen = physical
    else:
        try:
            indices = sorted({int(i) for i in spec.split(",") if i.strip()})
        except ValueError:
            raise InputError(f"--gpus must be all, none or GPU indices like 0,1; got {gpus!r}")
        missing = [i for i in indices if i >= len(physical) or i < 0]
        if missing or not indices:
            raise InputError(f"--gpus {gpus}: this machine has {len(physical)} GPU(s) "
                             f"(indices 0-{len(physical) - 1})" if physical else
                             f"--gpus {gpus}: this machine has no GPU; use --gpus none")
        chosen = [physical[i] for i in indices]
        tf.config.set_visible_devices(chosen, "GPU")
    if not chosen:
        return _cpu_strategy(cpu_devices, "no GPU found")
    if cpu_devices > 1:
        raise InputError(f"--cpu-devices {cpu_devices} splits the CPU, but this run trains on "
                         f"{len(chosen)} GPU(s); add --gpus none to train on the split CPU")
    for device in chosen:
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except (ValueError, RuntimeError):
            pass
    logical = [f"/gpu:{i}" for i in range(len(chosen))]
    names = ", ".join(d.name for d in chosen)
    if len(chosen) == 1:
        return tf.distribute.OneDeviceStrategy(logical[0]), f"1 GPU ({names})", True
    return (tf.distribute.MirroredStrategy(logical),
            f"{len(chosen)} GPUs, MirroredStrategy ({names})", True)


def _cluster_strategy(gpus: str, cpu_devices: int, cluster, worker_timeout: float):
    import tensorflow as tf

    if cpu_devices > 1:
        raise InputError(f"--cpu-devices {cpu_devices}: a multi-worker run (TF_CONFIG) trains "
                         f"on one CPU device per worker; leave --cpu-devices at 1")
    physical = tf.config.list_physical_devices("GPU")
    spec = str(gpus).strip().lower()
    if spec == "none":
        chosen = []
    elif spec == "all":
        chosen = physical
    else:
        try:
            chosen = [physical[int(i)] for i in spec.split(",") if i.strip()]
        except (ValueError, IndexError):
            raise InputError(f"--gpus {gpus}: this worker has {len(physical)} GPU(s)") from None
    if physical:
        tf.config.set_visible_devices(chosen, "GPU")
    for device in chosen:
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except (ValueError, RuntimeError):
            pass
    strategy = make_strategy(cluster, worker_timeout)
    where = f"{len(chosen)} GPU(s) each" if chosen else "the CPU"
    return (strategy, f"{cluster.workers} workers on {where}, MultiWorkerMirroredStrategy "
                      f"(this is {cluster.name}{', the chief' if cluster.is_chief else ''})",
            bool(chosen))


def _cpu_strategy(cpu_devices: int, why: str):
    import tensorflow as tf

    if cpu_devices == 1:
        return tf.distribute.get_strategy(), f"CPU ({why})", False
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)])
    except RuntimeError:  # TensorFlow already started: fine if it has exactly that split.
        have = len(tf.config.list_logical_devices("CPU"))
        if have != cpu_devices:
            raise InputError(f"--cpu-devices {cpu_devices}: TensorFlow already started in this "
                             f"process with {have} CPU device(s); the split must be set before "
                             f"anything else uses TensorFlow (start a new process)") from None
    logical = [f"/cpu:{i}" for i in range(cpu_devices)]
    return (tf.distribute.MirroredStrategy(logical),
            f"CPU split into {cpu_devices} logical devices, MirroredStrategy ({why})", False)


CPU_BFLOAT16_ENV = "TCLF_CPU_BFLOAT16"  # "1" / "0": override the CPU flag check below.
CPUINFO = "/proc/cpuinfo"


def cpu_supports_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX).

    The environment variable TCLF_CPU_BFLOAT16=1 or =0 overrides the check
    (to reproduce on one machine what `--precision auto` does on another).
    """
    forced = os.environ.get(CPU_BFLOAT16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise InputError(f"{CPU_BFLOAT16_ENV} must be 0 or 1, got {forced!r}")
        return forced == "1"
    try:
        with open(cpuinfo or CPUINFO) as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str = "auto", on_gpu: bool = False) -> str:
    """The Keras dtype policy for `--precision`.

    auto: mixed_float16 on GPUs. On CPUs, mixed_bfloat16 only where the CPU
    computes in bfloat16 natively; elsewhere it is emulated and measured
    slower than float32 (BENCHMARKS.md), so float32.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if on_gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_supports_bfloat16() else "float32"
