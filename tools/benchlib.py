"""Small helpers shared by the benchmark scripts: machine description and BENCHMARKS.md sections.

Each script owns one section of BENCHMARKS.md, between
``<!-- name -->`` and ``<!-- /name -->``, and rewrites only that section.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")


def machine(gpu: str | None = None) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        match = re.search(r"model name\s*:\s*(.+)", info)
        cpu = match.group(1).strip() if match else cpu
        native = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", info)))
        cpu += (f" (native bfloat16: {', '.join(native)})" if native else
                " (no native bfloat16)")
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
            memory = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    versions = [f"Python {platform.python_version()}"]
    found = {}
    for name in ("keras", "librosa", "numpy"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    # Only the frameworks this process has loaded (importing them costs seconds).
    versions += [f"{n} {sys.modules[n].__version__}" for n in ("tensorflow", "jax", "torch")
                 if n in sys.modules]
    versions += [f"{n} {v}" for n, v in found.items()]
    return (f"{cpu}, {os.cpu_count()} cores{memory}, {gpu or 'no GPU'}; {', '.join(versions)}; "
            f"measured {time.strftime('%Y-%m-%d')}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    text = open(BENCHMARKS).read() if os.path.exists(BENCHMARKS) else (
        "# Benchmarks\n\nProduced by the scripts in tools/; each ratio is measured within one run "
        "of its script on one machine (these machines are noisy, so compare ratios, not "
        "absolute rates across runs).\n")
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    from tclf import storage

    storage.write_atomic(BENCHMARKS, text)


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "NOT met"


def paired(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """Ratios of two measurements taken side by side, round by round: (median, low, high).

    On a shared, noisy machine a round's two measurements see the same conditions,
    so their ratio is steadier than a ratio of rates taken minutes apart.
    """
    ratios = sorted(n / d for n, d in zip(numerators, denominators, strict=True))
    return statistics.median(ratios), ratios[0], ratios[-1]


def in_subprocess(script: str, function: str, *args) -> dict:
    """``function(*args)`` of the module file ``script``, run in a fresh Python process (its
    own Keras policy, framework state and device memory); its JSON-able result."""
    folder, module = os.path.split(os.path.abspath(script))
    module = module[:-3]
    code = (f"import sys, json; sys.path[:0] = [{folder!r}, {ROOT!r}]; import {module}; "
            f"print('RESULT', json.dumps({module}.{function}{args!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise RuntimeError(f"{function}{args}: {done.stderr[-3000:]}")
    return json.loads(line[0][7:])
