"""Demo: python3 image from Debian packages → `salmiac convert` → `salmiac run --emulate`.

The input image is assembled by the test fixtures' recipe (Debian's python3-minimal and a small script that
prints its argv, environment, uid/gid and cwd as JSON), independently of salmiac's own image writer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("SALMIAC_CACHE_DIR", str(REPO / ".cache" / "salmiac"))

from fixtures.images import build_python  # noqa: E402

SALMIAC = [sys.executable, "-m", "salmiac"]


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    step("building a python3 image from Debian packages (cached after the first run)")
    image = build_python()
    print(f"input image: {image.ref}")
    with tempfile.TemporaryDirectory(prefix="salmiac-demo-") as tmp:
        return demo(image.ref, Path(tmp))


def demo(image_ref: str, work: Path) -> int:
    output = f"oci:{work / 'converted'}:demo"
    request = {
        "input_image": {"name": image_ref},
        "output_image": {"name": output},
        "converter_options": {"env_vars": ["APP_MODE=demo"]},
        "nitro_enclaves_options": {"cpu_count": 1, "mem_size": "1024M"},
    }
    req_path = work / "request.json"
    req_path.write_text(json.dumps(request, indent=2))
    step(f"salmiac convert {req_path}")
    convert = subprocess.run([*SALMIAC, "convert", str(req_path)], stdout=subprocess.PIPE)
    if convert.returncode != 0:
        return convert.returncode
    print(convert.stdout.decode(), end="")
    step(f"salmiac run --emulate {output} exit=42 hello-from-the-enclave")
    run = subprocess.run([*SALMIAC, "run", "--emulate", output, "exit=42", "hello-from-the-enclave"])
    print(f"\n(the app's exit code, passed through: {run.returncode})")
    return 0 if run.returncode == 42 else 1


if __name__ == "__main__":
    sys.exit(main())
