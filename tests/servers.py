"""`vllm serve` on loopback for the tests, and model directories with a
planted e3/ deployment (symlinks to the prepared weights)."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


# The planted deployment (test_serving, test_serve, test_data_parallel): exits
# 8/15/22 that never fire by default, and a calibration table whose rows send
# every decode token out at 15 (target <= 0.9), at 22 (<= 0.95), or nowhere.
PLANTED_CONFIG = {"policy": "token", "exits": [8, 15, 22], "confidence": "max_prob"}
PLANTED_TABLE = {"exits": [8, 15, 22], "table": [
    {"target_agreement": 0.9, "policy": "token", "chosen": {"measure": "max_prob", "thresholds": [None, 0.0, None]}},
    {"target_agreement": 0.95, "policy": "token", "chosen": {"measure": "max_prob", "thresholds": [None, None, 0.0]}},
    {"target_agreement": 0.99, "policy": "full", "chosen": None},
]}
COMMON = ["--dtype", "float32", "--enforce-eager", "--served-model-name", "m", "--max-model-len", "1024"]
KNOBS_ARGS = ["--model-impl", "e3", *COMMON, "--max-num-seqs", "16"]
PLUGINS = {"VLLM_PLUGINS": "e3,e3_http"}   # the per-response routes are opt-in (vllm_e3/http.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model_dir: str, args: list[str], log_path, env: dict | None = None, timeout: float = 300):
    """Yields (base url ".../v1", the server's Popen). Stops it on exit."""
    port = free_port()
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    with open(log_path, "w") as f:
        # its own process group: stopping it stops its engine core and
        # workers too, even when it is stopped half-started
        proc = subprocess.Popen([vllm, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), *args],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start:\n" + open(log_path).read()[-4000:])
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)     # whatever of the group is left
        proc.wait()


def planted_model_dir(src: str, dst: str, config: dict | None = None, calibration: dict | None = None) -> str:
    """`dst`: every file of the prepared model `src` but e3/ (symlinked), and
    an e3/ holding the given config.json / calibration.json."""
    from vllm_e3.prepare import model_view

    model_view(src, dst)
    os.makedirs(os.path.join(dst, "e3"), exist_ok=True)
    for name, body in (("config.json", config), ("calibration.json", calibration)):
        if body is not None:
            with open(os.path.join(dst, "e3", name), "w") as f:
                json.dump(body, f)
    return dst


def process_tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, bytes."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


# ---- HTTP clients for the tests ---------------------------------------------------------------
def post(url: str, body, timeout: float = 120) -> tuple[int, dict]:
    """POST JSON (or raw bytes): (status, the JSON body; {"raw": text} when it is not JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def get(url: str) -> tuple[int, dict | str]:
    """GET: (status, the JSON body, or the text when it is not JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if body.startswith("{") else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def complete(url: str, prompt: str, max_tokens: int = 8, model: str = "m", **xargs) -> tuple[int, dict]:
    """A greedy completion; `xargs` go in `vllm_xargs` (the E3 knobs)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if xargs:
        body["vllm_xargs"] = xargs
    return post(f"{url}/completions", body)


def root(url: str) -> str:
    """The server's root from its ".../v1" url."""
    return url[: -len("/v1")]
