"""Training on several machines: TF_CONFIG, MultiWorkerMirroredStrategy and who writes.

When TF_CONFIG has more than one training task (jobs "chief" and "worker"), every task runs
the same `tclf-train` command (docs/cluster.md). :func:`from_env` reads TF_CONFIG without
starting TensorFlow; :func:`make_strategy` bounds every collective and the start-up wait, so
a dead or missing worker makes the others fail instead of waiting forever; :func:`lost_worker`
turns the errors after a worker loss into one line. The chief (task "chief", else worker 0)
alone writes the version folder, the reports and latest.h5; the others train in a private
temporary folder, removed at the end (tclf.training.train).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import sys

from tclf import InputError, RunError
from tclf.training import compat

TRAINING_JOBS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in the cluster TF_CONFIG describes."""

    task_type: str
    task_id: int
    workers: int  # Training tasks: the chief and the workers.
    index: int  # This task's input pipeline: 0 the chief, then the workers in order.
    is_chief: bool

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.task_id}"


def from_env(environ=None) -> Cluster | None:
    """The cluster in TF_CONFIG, or None when there is none (or only one training task)."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config.get("cluster") or {}, config.get("task") or {}
        task_type, task_id = task.get("type"), int(task.get("index", 0))
        counts = {job: len(cluster.get(job) or []) for job in TRAINING_JOBS}
    except (ValueError, TypeError, AttributeError) as error:
        raise InputError(f"TF_CONFIG is not a valid cluster description ({error}); expected "
                         f'{{"cluster": {{"worker": ["host:port", ...]}}, '
                         f'"task": {{"type": "worker", "index": 0}}}}') from None
    for job, tasks in cluster.items():  # A list of "host:port", one per task.
        if not (isinstance(tasks, list) and all(isinstance(t, str) and ":" in t for t in tasks)):
            raise InputError(f"TF_CONFIG: the {job!r} job must be a list of \"host:port\" "
                             f"strings, one per task, got {tasks!r}")
    other = sorted(set(cluster) - set(TRAINING_JOBS))
    if other:
        raise InputError(f"TF_CONFIG: jobs {other} are not supported; tclf-train's clusters "
                         f"have a \"worker\" job (and optionally one \"chief\")")
    if counts["chief"] > 1:
        raise InputError(f"TF_CONFIG: {counts['chief']} chiefs; a cluster has at most one")
    total = sum(counts.values())
    if total <= 1:
        return None
    if task_type not in TRAINING_JOBS or not 0 <= task_id < counts.get(task_type, 0):
        raise InputError(f"TF_CONFIG: task {task_type!r} {task_id} is not in the cluster "
                         f"(it has {counts['chief']} chief and {counts['worker']} worker(s))")
    has_chief = counts["chief"] == 1
    index = 0 if task_type == "chief" else task_id + has_chief
    return Cluster(task_type, task_id, total, index, is_chief=index == 0)


def make_strategy(cluster: Cluster, timeout_seconds: float):
    """MultiWorkerMirroredStrategy for TF_CONFIG, every collective (gradients, metrics, the
    final barrier) and the start-up wait for the other workers bounded by
    ``timeout_seconds``. Must run before anything else uses TensorFlow."""
    import tensorflow as tf

    compat.patch_keras()
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = resolver.cluster_spec()
    compat.configure_coordination(spec, [job for job in TRAINING_JOBS if job in spec.jobs],
                                  timeout_seconds)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    # TensorFlow waits for every task at start-up without a bound (the registration timeout
    # above does not end that wait in TF 2.21), in C++ that holds the GIL: no Python thread
    # or signal handler runs meanwhile. A watchdog process ends the wait.
    own = spec.task_address(cluster.task_type, cluster.task_id)
    if port_taken(int(own.rsplit(":", 1)[1])):
        raise InputError(f"TF_CONFIG: {cluster.name}'s address {own} has its port in use on "
                         f"this machine: is another task with the same type and index running "
                         f"here? Every task needs its own index and address")
    addresses = ", ".join(f"{job} {i} at {address}" for job in TRAINING_JOBS
                          if job in spec.jobs for i, address in enumerate(spec.job_tasks(job)))
    watchdog = _watchdog(timeout_seconds, (
        f"the cluster did not come together within {timeout_seconds:g} s (--cluster-timeout): "
        f"{cluster.name} waited for the others ({addresses}); start every worker with the "
        f"same TF_CONFIG cluster and check that their ports are reachable"))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                         communication_options=options)
    except tf.errors.OpError as error:
        raise lost_worker(error, cluster, "starting", resume=None) from None
    finally:
        watchdog.kill()
        watchdog.wait()


def port_taken(port: int) -> bool:
    """Whether a process of this machine listens on TCP ``port`` (any address). A gRPC server
    sharing the port (SO_REUSEPORT) would start and then fail obscurely: this asks first."""
    import socket

    if not port:
        return False
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((address, port))
            return False
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            continue  # No IPv6 here: try IPv4.
    return False


_WATCHDOG = """
import os, signal, sys, time
parent, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    time.sleep(0.2)
    if os.getppid() != parent:
        sys.exit(0)
sys.stderr.write("Error: RunError: " + sys.argv[3] + "\\n")
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)
"""


_SERVICE_WATCHDOG = """
import os, signal, socket, sys, time
parent, host, port, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
last = time.monotonic()
while os.getppid() == parent:
    try:
        socket.create_connection((host, port), timeout=5).close()
        last = time.monotonic()
    except OSError:
        if time.monotonic() - last > seconds:
            sys.stderr.write(f"Error: RunError: the tf.data service dispatcher at {host}:{port} "
                             f"has not answered for {seconds:g} s (--timeout): this worker "
                             f"stops; start it again once the dispatcher runs\\n")
            sys.stderr.flush()
            os.kill(parent, signal.SIGKILL)
            break
    time.sleep(2)
"""


def service_watchdog(address: str, seconds: float):
    """A small process that kills this one (a tf.data service worker, waiting in TensorFlow)
    with one line when the dispatcher at ``address`` (host:port) has not accepted a
    connection for ``seconds``; it ends with this process."""
    import subprocess

    host, port = address.rsplit(":", 1)
    return subprocess.Popen([sys.executable, "-c", _SERVICE_WATCHDOG, str(os.getpid()), host,
                             port, str(seconds)], stdin=subprocess.DEVNULL)


def _watchdog(seconds: float, message: str):
    """A small process that prints ``message`` and kills this one after ``seconds``, unless
    killed first."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds),
                             message], stdin=subprocess.DEVNULL)


# A barrier waits for work some workers do alone (the stage-1 pass over their own records,
# the chief's reports), which grows with the data; a dead worker still ends the wait within
# seconds (the coordination service's heartbeat), so the bound is only for a hung one.
LONG_WAIT_SECONDS = 24 * 3600.0


def barrier(name: str, timeout_seconds: float = LONG_WAIT_SECONDS) -> None:
    """Wait until every task of the cluster reaches this point (the coordination service's
    barrier): after the stage-1 pass, and at the end of a run, so that no worker leaves
    while the chief still writes."""
    compat.wait_at_barrier(name, timeout_seconds)


def is_lost_worker(error: BaseException) -> bool:
    """Whether TensorFlow's ``error`` is how a collective or the coordination service reports
    a worker that died, hangs or cannot be reached."""
    import tensorflow as tf

    return isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                              tf.errors.DeadlineExceededError, tf.errors.CancelledError))


def lost_worker(error: BaseException, cluster: Cluster, doing: str = "training",
                resume: str | None = "--resume vN") -> RunError:
    """The one line a user sees when the cluster breaks: which task TensorFlow blames (when
    it names one), its reason, and how to go on (``resume``: the option to add; None when
    there is no run to resume)."""
    text = getattr(error, "message", None) or str(error)
    # "Error reported from /job:worker/task:0: The following tasks are unhealthy (stopped
    # sending heartbeats):\n/job:worker/replica:0/task:2": task 0 reports, task 2 died.
    listed = text.split("unhealthy", 1)[1] if "unhealthy" in text else text
    listed = re.sub(r"reported from /job:\w+/(?:replica:\d+/)?task:\d+", "", listed)
    own = (cluster.task_type, str(cluster.task_id))
    blamed = sorted({f"{job} {task}" for job, task in
                     re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", listed)
                     if (job, task) != own and job != "localhost"})
    reason = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\[type\.googleapis[^\]]*\]", "", text)
    reason = " ".join(reason.split())[:160].rstrip(" .:")
    who = (f"{' and '.join(blamed)} stopped (died, hung or cannot be reached)" if blamed
           else "a worker died, hung or cannot be reached")
    again = f" and {resume}" if resume else ""
    return RunError(f"the cluster failed while {doing}: {who}; {cluster.name} stops too "
                    f"(TensorFlow: {reason}). Start every worker again with the same "
                    f"command{again} (docs/cluster.md)")


def agree(cluster: Cluster, what: dict, timeout_seconds: float) -> None:
    """Check that every worker runs the same thing: each publishes ``what`` (options,
    resumed run, precision, replicas) in the coordination service and compares the others'.
    Workers that differ would run different collectives (a hang) or diverge silently."""
    mine = json.dumps(what, sort_keys=True, default=str)
    compat.set_key(f"tclf/run/{cluster.index}", mine)
    for index in range(cluster.workers):
        if index == cluster.index:
            continue
        theirs = compat.get_key(f"tclf/run/{index}", timeout_seconds)
        if theirs != mine:
            a, b = json.loads(mine), json.loads(theirs)
            differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            pairs = ", ".join(f"{k}: {b.get(k)!r} vs {a.get(k)!r}" for k in differ[:3])
            raise InputError(f"the workers of this cluster were not started alike: task "
                             f"{index} differs from {cluster.name} in {', '.join(differ)} "
                             f"({pairs}); start every worker with the same command (and the same "
                             f"--resume vN)")
