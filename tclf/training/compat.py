"""Every use of TensorFlow's and Keras' private API, in one place: the coordination
service of a multi-worker run, and the Keras 3.15 multi-worker patch.

Checked with TensorFlow 2.16-2.21 and Keras 3.15 (pyproject pins both).
"""

from __future__ import annotations

import os


def configure_coordination(spec, jobs: list[str], timeout_seconds: float) -> None:
    """The coordination service as MultiWorkerMirroredStrategy would configure it, with two
    of its timeouts set: registration (a worker that never starts) and the shutdown barrier
    (a worker that dies at the end). Its heartbeat (10 s) detects a dead worker."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    milliseconds = int(timeout_seconds * 1000)
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(spec),
        cluster_register_timeout_in_ms=milliseconds,
        shutdown_barrier_timeout_in_ms=milliseconds,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
            name=job, num_tasks=spec.num_tasks(job)) for job in jobs])


def wait_at_barrier(name: str, timeout_seconds: float) -> None:
    from tensorflow.python.eager import context

    context.context().wait_at_barrier(name, int(timeout_seconds * 1000))


def set_key(key: str, value: str) -> None:
    """A value every task of the cluster can read (the coordination service's store)."""
    from tensorflow.python.eager import context

    context.context().set_config_key_value(key, value)


def get_key(key: str, timeout_seconds: float) -> str:
    """Another task's value, waiting up to ``timeout_seconds`` for it to be set."""
    from tensorflow.python.eager import context

    return context.context().get_config_key_value(key, int(timeout_seconds * 1000))


# Keras 3.15 fails inside model.fit under MultiWorkerMirroredStrategy with more than one
# worker (keras-team/keras#20585, open): in keras/src/backend/tensorflow/trainer.py,
#  1. TensorFlowTrainer._maybe_symbolic_build reduces the first distributed batch with
#     strategy.reduce("MEAN", batch, axis=None), only to read its shapes and dtypes; in
#     multi-worker mode that raises "Attempt to convert a value (PerReplica...) to a Tensor".
#     Fixed here by building from this worker's first replica's part of the batch.
#  2. reduce_per_replica reduces every metric with strategy.reduce("MEAN", v, axis=0), which
#     raises "Invalid reduction dimension 0 for input with 0 dimensions" for the scalar
#     metrics. Fixed here by reducing scalars over the replicas only (axis=None): the mean of
#     the workers' values, the same on every worker.
# Both replacements call Keras' own code outside multi-worker mode, so single-process runs
# are untouched. tests/test_cluster.py trains two workers; it fails without this patch.
_PATCHED = []
KERAS_PATCHED_FOR = "3.15."


def patch_keras() -> None:
    """Install the two fixes above (once per process). TCLF_KERAS_PATCH=0 leaves Keras as it
    is, to check whether a new Keras still needs them."""
    if _PATCHED or os.environ.get("TCLF_KERAS_PATCH", "1") == "0":
        return
    import keras
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if (not keras.__version__.startswith(KERAS_PATCHED_FOR)
            or not hasattr(tf_trainer, "_collective_all_reduce_multi_worker")
            or not hasattr(tf_trainer, "reduce_per_replica")
            or not hasattr(tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build")):
        raise RuntimeError(f"tclf.training.compat.patch_keras is written for Keras "
                           f"{KERAS_PATCHED_FOR}x; this is Keras {keras.__version__}: check "
                           f"whether keras-team/keras#20585 is fixed and update the patch")
    multi_worker = tf_trainer._collective_all_reduce_multi_worker
    original_reduce = tf_trainer.reduce_per_replica
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if not (multi_worker(strategy) and reduction in ("auto", "mean")):
            return original_reduce(values, strategy, reduction)

        def mean(value):
            local = (strategy.experimental_local_results(value)[0]
                     if isinstance(value, tf.distribute.DistributedValues) else value)
            rank = getattr(getattr(local, "shape", None), "rank", None)
            return strategy.reduce("MEAN", value, axis=None if rank == 0 else 0)

        return tf.nest.map_structure(mean, values)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tf.nest.map_structure(
                lambda v: (strategy.experimental_local_results(v)[0]
                           if isinstance(v, tf.distribute.DistributedValues) else v), batch)
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    _PATCHED.append(True)
