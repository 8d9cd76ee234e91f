import os
from pathlib import Path

pytest_plugins = ["fixtures.registry", "fixtures.images"]

REPO = Path(__file__).resolve().parents[1]
# Kernel, enclave base, parent layer and blobs are cached across test runs (and shared with the demo).
os.environ.setdefault("SALMIAC_CACHE_DIR", str(REPO / ".cache" / "salmiac"))
