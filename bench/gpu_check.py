"""`make gpu-check`: every GPU check of this backend in one command, within 8 minutes (docs/gpu.md).

    python -m bench.gpu_check [--wheels gpu_wheels] [--out DIR] [--budget 480] [--only pytest,alp]
    python -m bench.gpu_check --dry --wheels DIR --out DIR     # CPU: install + report, GPU steps skipped

1. install: the wheels of ``make gpu-wheels`` (megatron-core and the pure-Python dependencies the
   lent machine lacks) go into a private target directory with ``pip install --no-index --no-deps
   --target``; every later step runs with it on ``PYTHONPATH``. Skipped when ``megatron.core``
   already imports (a cluster node with the project installed).
2. ``pytest``: tests/gpu (bf16/fp16 optimizer steps from a driver-built batch, NaN skip,
   distributed-optimizer resume, ALP noise CUDA vs CPU, recompute, log-probs, IPC round trip).
3. ``alp``: bench.alp_overhead at Qwen2.5-7B layer shapes (hidden 3584, 28/4 heads, FFN 18944).
4. ``logprob``: bench.logprob, 152k vocabulary, 16k tokens, bf16, against Megatron's CE plus a
   softmax-saving entropy.
5. ``rl``: a tiny RL run end to end (bf16 training on the GPU, the local engine, the disk bus).
6. ``bus``: bench.gpu_bus, publication of ~1.5B parameters vs a plain safetensors save.

Each step runs in its own process under its own time limit (cut to what is left of ``--budget``);
the report (``gpu_check.json`` + ``gpu_check.md``) goes to ``--out``, else ``$OUT``, else
bench/results/, and lists every step's status, seconds, the reason of each skip and the tail of
each failure. Exit status 1 when a step failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_TAGS = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
               "--platform", "manylinux_2_28_x86_64"]
"""pip's tags for the lent machine (Python 3.12, x86-64 manylinux); used when installing for it elsewhere."""


@dataclass
class Step:
    name: str
    limit_s: int
    argv: Callable[[str], List[str]]  # out dir -> command
    what: str


@dataclass
class Result:
    name: str
    status: str  # passed | failed | skipped | timeout
    seconds: float = 0.0
    reason: str = ""
    detail: Dict = field(default_factory=dict)
    tail: str = ""


def _py(*a: str) -> Callable[[str], List[str]]:
    return lambda out: [sys.executable, *[x.replace("{out}", out) for x in a]]


STEPS = [
    Step("pytest", 200, _py("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests/gpu",
                            "--junitxml={out}/gpu_pytest.xml"),
         "tests/gpu: the GPU-only fixes, one test each"),
    Step("alp", 60, _py("-m", "bench.alp_overhead", "--layers", "2", "--hidden", "3584", "--heads", "28",
                        "--groups", "4", "--ffn", "18944", "--seq", "8192", "--batch", "1", "--vocab", "4096",
                        "--precision", "bf16", "--reps", "4", "--out", "{out}/alp_overhead.json"),
         "ALP time and peak memory on/off at Qwen2.5-7B layer shapes, bf16, 8k tokens"),
    Step("logprob", 60, _py("-m", "bench.logprob", "--tokens", "16384", "--vocab", "151936", "--dtypes", "bfloat16",
                            "--tp", "1", "--reps", "3", "--methods", "megatron,megatron+H,ours,ours+H",
                            "--out", "{out}/logprob-gpu.md"),
         "log-prob + entropy vs Megatron CE + softmax-saving entropy, 152k vocab, 16k tokens, bf16"),
    Step("rl", 150, _py("-m", "bench.gpu_rl", "--out", "{out}/gpu_rl.json"),
         "a tiny RL run end to end: bf16 training on the GPU, local engine, disk bus"),
    Step("bus", 60, _py("-m", "bench.gpu_bus", "--out", "{out}/gpu_bus.json"),
         "bus publication of ~1.5B parameters vs plain safetensors save"),
]


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if text else ""


def _megatron_importable(env) -> bool:
    r = subprocess.run([sys.executable, "-c", "import megatron.core"], env=env, capture_output=True, timeout=120)
    return r.returncode == 0


def install(wheels: str, target: str, env: dict, dry: bool, limit_s: int) -> Result:
    """Install the kit's wheels into ``target`` (offline, no dependency resolution)."""
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    t0 = time.perf_counter()
    if not files:
        if _megatron_importable(env):
            return Result("install", "skipped", reason="no wheels given and megatron.core imports already")
        return Result("install", "failed", reason=f"no wheels in {wheels!r} (run `make gpu-wheels` with network "
                                                  f"first) and megatron.core does not import")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", target]
    if dry or sys.version_info[:2] != (3, 12):
        cmd += TARGET_TAGS  # install for the lent machine's interpreter, whatever runs this
    try:
        r = subprocess.run(cmd + files, capture_output=True, text=True, timeout=limit_s, env=env)
    except subprocess.TimeoutExpired:
        return Result("install", "timeout", time.perf_counter() - t0, reason=f"pip install over {limit_s} s")
    dists = sorted(os.path.basename(d) for d in glob.glob(os.path.join(target, "*.dist-info")))
    detail = {"wheels": [os.path.basename(f) for f in files], "bytes": sum(os.path.getsize(f) for f in files),
              "installed": dists, "target": target}
    status = "passed" if r.returncode == 0 and len(dists) == len(files) else "failed"
    return Result("install", status, time.perf_counter() - t0, detail=detail,
                  tail=_tail(r.stdout + r.stderr) if status == "failed" else "")


def _cuda_reason(env) -> Optional[str]:
    code = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    return None if r.returncode == 0 else "no CUDA device (torch.cuda.is_available() is False)"


def _read_detail(step: str, out: str) -> Dict:
    path = {"alp": "alp_overhead.json", "rl": "gpu_rl.json", "bus": "gpu_bus.json"}.get(step)
    if path and os.path.exists(os.path.join(out, path)):
        with open(os.path.join(out, path)) as f:
            return json.load(f)
    if step == "pytest" and os.path.exists(os.path.join(out, "gpu_pytest.xml")):
        import xml.etree.ElementTree as ET

        root = ET.parse(os.path.join(out, "gpu_pytest.xml")).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        cases = [{"name": c.get("name"), "outcome": ("failed" if c.find("failure") is not None or
                                                     c.find("error") is not None else
                                                     "skipped" if c.find("skipped") is not None else "passed"),
                  "seconds": float(c.get("time", 0))} for c in suite.iter("testcase")]
        return {"cases": cases}
    return {}


def run_step(step: Step, out: str, env: dict, limit_s: int) -> Result:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(step.argv(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Result(step.name, "timeout", time.perf_counter() - t0, reason=f"over its limit of {limit_s} s",
                      detail=_read_detail(step.name, out), tail=_tail(text))
    status = "passed" if r.returncode == 0 else "failed"
    return Result(step.name, status, time.perf_counter() - t0, detail=_read_detail(step.name, out),
                  tail=_tail(r.stdout + r.stderr, 6000 if status == "failed" else 1500))


def _device(env) -> str:
    code = ("import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'); "
            "print(torch.__version__)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = r.stdout.split("\n")
    return f"{lines[0]} (torch {lines[1] if len(lines) > 1 else '?'}, Python {platform.python_version()})"


def write_report(out: str, report: Dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    lines = [f"# gpu_check ({'dry run' if report['dry'] else 'full run'})", "",
             f"- Device: {report['device']}", f"- Command: `{report['command']}`",
             f"- Total: {report['seconds']:.0f} s of a {report['budget_s']} s budget", "",
             "| step | status | seconds | reason |", "| --- | --- | ---: | --- |"]
    for r in report["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['reason']} |")
    skipped = [r for r in report["steps"] if r["status"] == "skipped"]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {r['name']}: {r['reason']}" for r in skipped]
    for r in report["steps"]:
        if r["detail"]:
            lines += ["", f"## {r['name']}", "", "```json",
                      json.dumps(r["detail"], indent=1, default=str)[:4000], "```"]
        if r["status"] in ("failed", "timeout") and r["tail"]:
            lines += ["", f"### {r['name']}: output tail", "", "```", r["tail"], "```"]
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wheels", default=os.path.join(REPO, "gpu_wheels"))
    p.add_argument("--out", default=None, help="report directory (default $OUT, else bench/results)")
    p.add_argument("--budget", type=int, default=480, help="seconds for the whole kit")
    p.add_argument("--dry", action="store_true", help="CPU: install and report, skip every GPU step")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(s.name for s in STEPS))
    p.add_argument("--target", default=None, help="install directory (default: a new temporary one)")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out or os.environ.get("OUT") or os.path.join(REPO, "bench", "results"))
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    target = os.path.abspath(a.target) if a.target else tempfile.mkdtemp(prefix="gpu-site-")
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([REPO, target, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    results = [install(a.wheels, target, env, a.dry, 90)]
    wanted = set(a.only.split(",")) if a.only else {s.name for s in STEPS}
    no_cuda = None if a.dry else _cuda_reason(env)
    for step in STEPS:
        left = int(a.budget - (time.perf_counter() - start))
        if step.name not in wanted:
            results.append(Result(step.name, "skipped", reason="not in --only"))
        elif a.dry:
            results.append(Result(step.name, "skipped", reason="dry run (--dry): GPU steps are not run"))
        elif results[0].status not in ("passed", "skipped"):
            results.append(Result(step.name, "skipped", reason="the wheels did not install"))
        elif no_cuda:
            results.append(Result(step.name, "skipped", reason=no_cuda))
        elif left < 20:
            results.append(Result(step.name, "skipped", reason=f"only {left} s of the {a.budget} s budget left"))
        else:
            print(f"[gpu_check] {step.name}: {step.what} (limit {min(step.limit_s, left - 10)} s)", flush=True)
            results.append(run_step(step, out, env, min(step.limit_s, left - 10)))
            print(f"[gpu_check] {step.name}: {results[-1].status} in {results[-1].seconds:.0f} s", flush=True)
    report = {"dry": a.dry, "device": _device(env), "command": "python -m bench.gpu_check " + " ".join(
        sys.argv[1:] if argv is None else argv), "budget_s": a.budget, "seconds": time.perf_counter() - start,
        "steps": [asdict(r) for r in results]}
    write_report(out, report)
    print(f"[gpu_check] report: {out}/gpu_check.md", flush=True)
    for r in results:
        print(f"[gpu_check] {r.name:8s} {r.status:8s} {r.seconds:6.1f} s  {r.reason}", flush=True)
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
