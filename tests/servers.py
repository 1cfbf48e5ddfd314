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
import urllib.request


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
