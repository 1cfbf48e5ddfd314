"""E3 model classes: vLLM's Llama-family classes with ramps and early exits.

Registered lazily by "module:Class" strings (vllm_e3.register); importing this
package imports vLLM's model files.
"""
# architecture -> E3 class, in vllm_e3.models.e3_model
E3_ARCHITECTURES = {
    "LlamaForCausalLM": "E3LlamaForCausalLM",
    "MistralForCausalLM": "E3MistralForCausalLM",
    "Qwen2ForCausalLM": "E3Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "E3Qwen3ForCausalLM",
}
