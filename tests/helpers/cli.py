"""Run the salmiac CLI as a user would: a subprocess, with the venv's entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SALMIAC = [sys.executable, "-m", "salmiac"]


def salmiac(*args: str, timeout: float = 900, input: bytes | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SALMIAC, *args], capture_output=True, timeout=timeout, input=input, env=env)


def convert(tmp: Path, input_name: str, output_name: str, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "input_image": {"name": input_name},
        "output_image": {"name": output_name},
        "nitro_enclaves_options": {"cpu_count": 1, "mem_size": "1024M"},
    }
    for key, value in extra.items():
        request[key] = value
    req = tmp / f"request-{abs(hash(output_name))}.json"
    req.write_text(json.dumps(request))
    proc = salmiac("convert", "--quiet", str(req))
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(proc.stdout)
    return result
