"""Shared fixtures: a tiny random Llama with a tiny chat tokenizer (fast tests), the real SmolLM2 (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

# SmolLM2's chat template (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "You are a helpful assistant. You are a pirate. Answer briefly.",
    "How do I boil an egg? Why is the sky blue? Tell me a joke about cats and dogs.",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()-",
] * 4


def model_cache_dir() -> Path:
    """Where real-model tests keep the converted GGUF (persistent across runs: conversion is slow)."""
    from srmoa_dist.bench.model_cache import shared_model_cache

    return shared_model_cache()


def build_tiny_tokenizer():
    """A byte-level BPE (~300 tokens) trained on a few lines, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TINY_CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_llama(vocab_size: int, *, seed: int = 0, eos_token_id: int = 2, n_layers: int = 4):
    """LlamaForCausalLM with d=64, 4 layers, 4 heads (2 KV heads), random weights from `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tiny_tokenizer):
    """BaseModel around a tiny random Llama: query_layer 1, experts on layers 2..3, CPU float32."""
    from srmoa_dist.config import ModelConfig
    from srmoa_dist.model.loading import from_model

    model = build_tiny_llama(len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id)
    cfg = ModelConfig(
        name_or_path="tiny-random-llama",
        device="cpu",
        query_layer=1,
        relation_layer=None,
        max_new_tokens=8,
        system_prompt="You are a helpful assistant.",
    )
    return from_model(model, tiny_tokenizer, cfg, name="tiny-random-llama")


@pytest.fixture
def fusion(tiny_base):
    """An ExpertFusion (rank 4, alpha 8) on `tiny_base`'s model; its hooks are removed after the test."""
    from srmoa_dist.config import ExpertConfig
    from srmoa_dist.model.fusion import ExpertFusion

    f = ExpertFusion(tiny_base.model, ExpertConfig(rank=4, alpha=8.0), query_layer=tiny_base.query_layer)
    yield f
    f.remove()


@pytest.fixture(scope="session")
def smollm2_base():
    """The real SmolLM2-135M-Instruct (GGUF, converted once into model_cache_dir()), CPU float32."""
    from srmoa_dist.config import ModelConfig
    from srmoa_dist.model.loading import load_base_model

    return load_base_model(ModelConfig(device="cpu"), model_cache_dir())


@pytest.fixture(scope="session")
def make_tiny_model():
    """A callable returning a fresh (tiny random Llama, tiny tokenizer) pair, same weights every call."""

    def make(seed: int = 0):
        tok = build_tiny_tokenizer()
        return build_tiny_llama(len(tok), seed=seed, eos_token_id=tok.eos_token_id), tok

    return make


@pytest.fixture()
def tiny_bench_base(make_tiny_model):
    """(BaseModel over a fresh tiny random Llama, its ModelConfig): what the benchmark smoke tests run."""
    from srmoa_dist.config import ModelConfig
    from srmoa_dist.model.loading import from_model

    model, tok = make_tiny_model(seed=0)
    mcfg = ModelConfig(name_or_path="tiny", device="cpu", query_layer=1, relation_layer=None,
                       max_new_tokens=8, system_prompt="You are a helpful assistant.")
    return from_model(model, tok, mcfg, name="tiny-random-llama"), mcfg


@pytest.fixture(scope="session")
def make_tiny_world(make_tiny_model):
    """A callable (ExpertConfig, d_key) -> (base, fusion, encoder) over a private tiny model (so no other
    test shares its hooks); the caller removes the fusion's hooks when done."""
    from srmoa_dist.config import ModelConfig
    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.loading import from_model
    from srmoa_dist.routing.query_encoder import CALIBRATION_PROMPTS, QueryEncoder

    def make(ecfg, d_key: int):
        model, tok = make_tiny_model(seed=0)
        mcfg = ModelConfig(name_or_path="tiny", device="cpu", query_layer=1, relation_layer=None,
                           max_new_tokens=8, system_prompt="You are a helpful assistant.")
        base = from_model(model, tok, mcfg)
        fusion = ExpertFusion(base.model, ecfg, query_layer=base.query_layer)
        enc = QueryEncoder.calibrate(base, d_key=d_key, prompts=CALIBRATION_PROMPTS[:32])
        return base, fusion, enc

    return make


@pytest.fixture(scope="session")
def smollm2_cache_dir() -> Path:
    return model_cache_dir()


@pytest.fixture(scope="module")
def one_torch_thread():
    """A tiny model runs as fast on one thread, and two threads crawl when the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
