"""Files vllm-e3 writes: whole or not at all."""
from __future__ import annotations

import json
import os


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """`obj` as JSON at `path`, atomically: a temporary file beside it (named
    for this process, so two writers never share one), then a rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)
