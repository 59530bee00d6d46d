#!/usr/bin/env python
"""Benchmark the reader through a tf.data service against the reader in the process.

Writes the "data-service" section of BENCHMARKS.md. Usage (after tools/setup.sh and the
demo, whose records/ it reads by default):

    .venv/bin/python tools/bench_data_service.py [--records records] [--batches 40]

Both read the training split as tclf-train does (make_dataset, training=True, repeated,
batch 32, 299x299 PNGs decoded). "in-process": this process reads and decodes. "service":
`tclf-data-service dispatcher` and two `tclf-data-service worker` processes on loopback
read and decode, and this process receives the batches ("distributed_epoch"), uncompressed
(tclf's default) and snappy-compressed (tf.data's default). Each round
measures both, one after the other; the ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import click  # noqa: E402

import benchlib  # noqa: E402

ROUNDS = 5
WARMUP = 3  # Batches read before the clock starts (a service job's start-up, buffers).
BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records_per_second(records: str, batches: int, batch_size: int,
                       service: str | None, compression: str | None = None) -> float:
    from tclf.data import reader

    dataset = reader.make_dataset(records, "train", batch_size, training=True, seed=0,
                                repeat=True, data_service=service,
                                service_compression=compression)
    iterator = iter(dataset)
    for _ in range(WARMUP):
        next(iterator)
    started, count = time.perf_counter(), 0
    for _ in range(batches):
        count += int(next(iterator)[1].shape[0])
    return count / (time.perf_counter() - started)


def start_service(workers: int = 2):
    port = _free_port()
    command = os.path.join(BIN, "tclf-data-service")
    processes = [subprocess.Popen([command, "dispatcher", "--port", str(port)],
                                  stdout=subprocess.DEVNULL)]
    time.sleep(3)
    processes += [subprocess.Popen([command, "worker", "--dispatcher", f"localhost:{port}",
                                    "--host", "localhost"], stdout=subprocess.DEVNULL)
                  for _ in range(workers)]
    time.sleep(5)
    return f"localhost:{port}", processes


@click.command()
@click.option("--records", default="records", help="A pack (the demo's by default).")
@click.option("--batches", default=40, help="Batches timed per measurement.")
@click.option("--batch-size", default=32)
@click.option("--rounds", default=ROUNDS)
def main(records, batches, batch_size, rounds):
    import tensorflow as tf  # noqa: F401

    address, processes = start_service()
    local, served, compressed = [], [], []
    try:
        for index in range(rounds):
            local.append(records_per_second(records, batches, batch_size, None))
            served.append(records_per_second(records, batches, batch_size, address))
            compressed.append(records_per_second(records, batches, batch_size, address,
                                                 "AUTO"))
            print(f"round {index + 1}: in-process {local[-1]:.1f} records/s, service "
                  f"{served[-1]:.1f} records/s, compressed {compressed[-1]:.1f}", flush=True)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
    ratio, low, high = benchlib.paired(served, local)
    snappy, snappy_low, snappy_high = benchlib.paired(compressed, local)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    body = f"""## The reader through a tf.data service (tools/bench_data_service.py)

Machine: {benchlib.machine()}.

The training split of `{records}` read as tclf-train reads it (batch {batch_size}, 299x299
PNGs decoded, shuffled, repeated), {batches} batches per measurement after {WARMUP} of warm-up,
{rounds} rounds, each measuring both side by side.

| reader | records/s (median) |
|---|---:|
| in-process (`tclf-train`) | {median(local):.1f} |
| tf.data service: 1 dispatcher + 2 workers on loopback (`--data-service`), batches uncompressed (tclf's choice) | {median(served):.1f} |
| the same, batches snappy-compressed (tf.data's default, `compression="AUTO"`) | {median(compressed):.1f} |

Service / in-process: **{ratio:.2f}x** (rounds: {low:.2f}-{high:.2f}); compressed / in-process:
{snappy:.2f}x ({snappy_low:.2f}-{snappy_high:.2f}).

On this machine the service's workers share the trainer's CPU cores, so the service can
only add work (serializing, compressing and sending every batch over gRPC). It pays off
where the workers run on other machines and the trainer's own CPUs cannot decode as fast
as its GPUs consume: then the rate adds up over the workers' machines.
"""
    benchlib.write_section("data-service", body)
    print(body)


if __name__ == "__main__":
    main()
