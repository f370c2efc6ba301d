"""`python -m bench.gpu_check --dry` on CPU: the kit's wheel install into a private target directory
works offline, the report is written, and every GPU step is skipped with its reason."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

from bench.gpu_check import REPO, STEPS


def _tiny_wheel(dirpath: str) -> str:
    """A minimal valid py3-none-any wheel (stands in for the kit's wheels: no network in the suite)."""
    name, ver = "gpukit_probe", "0.1"
    files = {f"{name}/__init__.py": "VALUE = 41 + 1\n",
             f"{name}-{ver}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
             f"{name}-{ver}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{ver}.dist-info/RECORD,,")
    path = os.path.join(dirpath, f"{name}-{ver}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{name}-{ver}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_dry_run_installs_and_reports(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(str(wheels))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO, PIP_NO_INDEX="1")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--wheels", str(wheels), "--out", str(out),
                           "--target", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    inst = steps["install"]
    assert inst["status"] == "passed", inst
    assert inst["detail"]["installed"] == ["gpukit_probe-0.1.dist-info"]
    probe = subprocess.run([sys.executable, "-c", "import gpukit_probe; print(gpukit_probe.VALUE)"],
                           env=dict(os.environ, PYTHONPATH=inst["detail"]["target"]), capture_output=True, text=True)
    assert probe.stdout.strip() == "42"
    for s in STEPS:
        assert steps[s.name]["status"] == "skipped" and "dry run" in steps[s.name]["reason"], steps[s.name]
    md = (out / "gpu_check.md").read_text()
    assert "Skipped:" in md and all(f"- {s.name}: dry run" in md for s in STEPS)
