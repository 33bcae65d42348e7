"""Which base an adapter fits: the architecture-relevant fields of a model config and a hash of them.

Two bases with the same fingerprint have the same module names and weight shapes, so an adapter trained
on one loads onto the other (e.g. a local copy of a hub model); names, dtypes and label maps do not count.
"""

from __future__ import annotations

import hashlib
import json

from transformers import PretrainedConfig

ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "type_vocab_size", "hidden_act",
    "d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads", "encoder_layers",
    "decoder_layers", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
    "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings",
)


def architecture(config: PretrainedConfig) -> dict:
    values = config.to_dict()
    text_config = values.get("text_config") or {}
    return {field: values.get(field, text_config.get(field)) for field in ARCHITECTURE_FIELDS
            if values.get(field, text_config.get(field)) is not None}


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
