"""Shared fixtures: tiny models of each supported architecture, built from a config and saved to disk."""
from __future__ import annotations

import pytest
import torch

# The test models are tiny: one thread per process avoids OpenMP oversubscription, which makes
# small ops several times slower whenever anything else (a second test process, a build) runs.
torch.set_num_threads(1)


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


def tiny_llama(vocab=128, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def tiny_gpt2(vocab=128, hidden=64, layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2))


def tiny_qwen2(vocab=128, hidden=64, layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _save(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return _save(tiny_gpt2(), tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return _save(tiny_qwen2(), tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(params=["llama", "gpt2", "qwen2"])
def tiny_model_dir(request, tiny_llama_dir, tiny_gpt2_dir, tiny_qwen2_dir):
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "qwen2": tiny_qwen2_dir}[request.param]


needs_bnb = pytest.mark.skipif(
    not __import__("qlora_lite.quantize", fromlist=["bnb_available"]).bnb_available(),
    reason="bitsandbytes is not importable here")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
