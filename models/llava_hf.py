"""Saving a trained VLM as a transformers ``LlavaForConditionalGeneration`` with its ``LlavaProcessor``.

When the vision tower is an open_clip ViT (CLIP-style: class token, pre-norm, GELU or QuickGELU
MLPs), the folder written by :func:`export_hf` loads with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` and
generates with no conversion script: the ViT's weights are renamed into a ``CLIPVisionModel``
(the fused attention projection split into q, k and v), the projector becomes
``multi_modal_projector`` and the LM is stored as it is. The visual tokens are the same (block
``vision_layer``, class token dropped: ``vision_feature_select_strategy="default"``), and the
processor's resize, crop and normalisation are the tower's eval transform. Other towers (the
packaged EfficientNet-Lite0 of LiT) have no transformers Llava counterpart: their models are
saved in the project's own format (the training checkpoint, loaded with
:func:`models.training.vlm_checkpoint.load_trained_vlm`), and :func:`export_hf` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.llava import LlavaBundle


class NotExportable(ValueError):
    """The model has no transformers Llava equivalent (a CNN vision tower, a linear projector)."""


def export_hf(bundle: LlavaBundle, folder: str | Path) -> Path:
    """Write ``bundle`` as a transformers Llava model and processor under ``folder``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor

    model = bundle.model
    if not model.vision.is_vit:
        raise NotExportable(
            f"the vision tower of {bundle.config.vision!r} is not a ViT: transformers' Llava needs a "
            "CLIP-style ViT; keep the project's checkpoint (load_trained_vlm) for this model"
        )
    if bundle.config.merge_tokens is not None:
        raise NotExportable("transformers' Llava takes every patch token: leave merge_tokens unset to export")
    if bundle.config.projector != "mlp2x_gelu":
        raise NotExportable("transformers' Llava projector is Linear-GELU-Linear: use projector mlp2x_gelu")
    language_model = _base_language_model(model.language_model)
    visual = model.vision.visual
    vision_config = _clip_vision_config(visual)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=language_model.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.image_tokens,
        vision_feature_layer=bundle.config.vision_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(language_model.config.tie_word_embeddings),
    )
    hf = LlavaForConditionalGeneration(config).eval()
    hf.model.vision_tower.load_state_dict(_clip_vision_weights(visual), strict=True)
    projector = model.projector
    hf.model.multi_modal_projector.linear_1.load_state_dict(projector[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(projector[2].state_dict())
    hf.model.language_model.load_state_dict(language_model.model.state_dict())
    hf.lm_head.load_state_dict(language_model.lm_head.state_dict())
    folder = Path(folder)
    hf.save_pretrained(folder)
    size, spec = vision_config["image_size"], bundle.spec
    if spec.resize_mode != "shortest" or spec.interpolation != "bicubic":
        raise NotExportable(
            f"the tower's transform ({spec.resize_mode}, {spec.interpolation}) is not CLIP's "
            "shortest-side bicubic resize and centre crop, which LlavaImageProcessor does"
        )
    image_processor = LlavaImageProcessor(
        do_pad=bundle.config.image_aspect_ratio == "pad",  # to a square of the mean colour, as pixels() does
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        resample=3,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=bundle.tokenizer,
        patch_size=vision_config["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=bundle.tokenizer.chat_template,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return folder


def _base_language_model(language_model: torch.nn.Module) -> Any:
    """The plain causal LM, with LoRA adapters merged into its weights where peft wrapped it."""
    if hasattr(language_model, "merge_and_unload"):
        import copy

        return copy.deepcopy(language_model).merge_and_unload()
    return language_model


def _clip_vision_config(visual: Any) -> dict[str, Any]:
    blocks = visual.transformer.resblocks
    width = visual.class_embedding.shape[0]
    patch = visual.conv1.kernel_size[0]
    activation = type(blocks[0].mlp.gelu).__name__
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": blocks[0].mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].attn.num_heads,
        "image_size": visual.image_size[0],
        "patch_size": patch,
        "hidden_act": "quick_gelu" if activation == "QuickGELU" else "gelu",
        "layer_norm_eps": visual.ln_pre.eps,
        "projection_dim": width,
    }


def _clip_vision_weights(visual: Any) -> dict[str, torch.Tensor]:
    """open_clip ViT weights under ``CLIPVisionTransformer``'s names."""
    if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "ln_pre"):
        raise NotExportable("this ViT has attention pooling or no pre-norm: not a CLIP-style tower")
    state = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight,
        "pre_layrnorm.bias": visual.ln_pre.bias,
        "post_layernorm.weight": visual.ln_post.weight,
        "post_layernorm.bias": visual.ln_post.bias,
    }
    for i, block in enumerate(visual.transformer.resblocks):
        prefix = f"encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        pieces = {
            "self_attn.q_proj.weight": q,
            "self_attn.q_proj.bias": qb,
            "self_attn.k_proj.weight": k,
            "self_attn.k_proj.bias": kb,
            "self_attn.v_proj.weight": v,
            "self_attn.v_proj.bias": vb,
            "self_attn.out_proj.weight": block.attn.out_proj.weight,
            "self_attn.out_proj.bias": block.attn.out_proj.bias,
            "layer_norm1.weight": block.ln_1.weight,
            "layer_norm1.bias": block.ln_1.bias,
            "layer_norm2.weight": block.ln_2.weight,
            "layer_norm2.bias": block.ln_2.bias,
            "mlp.fc1.weight": block.mlp.c_fc.weight,
            "mlp.fc1.bias": block.mlp.c_fc.bias,
            "mlp.fc2.weight": block.mlp.c_proj.weight,
            "mlp.fc2.bias": block.mlp.c_proj.bias,
        }
        state.update({prefix + name: tensor for name, tensor in pieces.items()})
    return {name: tensor.detach().clone() for name, tensor in state.items()}
