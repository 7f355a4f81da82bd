"""`model.init_from`: a Hugging Face LLaMA directory on a local path, checked against `model.*` before any work.

The correspondence between `model.*` and a Hugging Face `LlamaConfig` lives here, once: the exporter writes it
(megaeff/interop/hf_export.py) and this check reads it, so the two cannot drift. Only `config.json` is read (plain
JSON); the weights are read later, by megaeff/interop/hf_import.py, and only from safetensors files: a pickled
`pytorch_model.bin` is refused, because loading one runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.config.model import ModelConfig

FIELD = "model.init_from"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

# model.<field> -> LlamaConfig key, for the keys that map one to one.
HF_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("dim", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("ffn_dim", "intermediate_size"),
    ("vocab_size", "vocab_size"),
    ("norm_eps", "rms_norm_eps"),
)


def hf_rope_theta(hf: Dict) -> float:
    """RoPE base of a config.json: transformers >= 4.56 nests it in `rope_parameters`, older ones keep it on top."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def hf_llama_config(m: ModelConfig) -> Dict:
    """The LlamaConfig keys that describe `m` (the exporter adds dtype, token ids and provenance)."""
    out = {hf_key: getattr(m, key) for key, hf_key in HF_FIELDS}
    out.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=m.n_kv_heads or m.n_heads,
        head_dim=m.dim // m.n_heads,
        max_position_embeddings=m.max_seq_len,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        rope_theta=m.rope_theta,  # read by transformers 4.x
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},  # read by transformers 5
        initializer_range=m.init_std,
    )
    return out


def hf_mismatches(m: ModelConfig, hf: Dict) -> List[str]:
    """`model.<field>=<ours> vs <hf key>=<theirs>` for every shape or numeric setting that differs."""
    diffs = []
    for key, hf_key in HF_FIELDS:
        if hf_key in hf and hf[hf_key] != getattr(m, key):
            diffs.append(f"model.{key}={getattr(m, key)} vs {hf_key}={hf[hf_key]}")
    kv = hf.get("num_key_value_heads") or hf.get("num_attention_heads")
    if kv is not None and kv != (m.n_kv_heads or m.n_heads):
        diffs.append(f"model.n_kv_heads={m.n_kv_heads} vs num_key_value_heads={kv}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != m.dim // m.n_heads:
        diffs.append(f"model.dim/model.n_heads={m.dim // m.n_heads} vs head_dim={head_dim}")
    if hf_rope_theta(hf) != m.rope_theta:
        diffs.append(f"model.rope_theta={m.rope_theta} vs rope_theta={hf_rope_theta(hf)}")
    return diffs


def _unsupported(hf: Dict) -> List[str]:
    """What a LLaMA-shaped megaeff model cannot represent (it would load, then compute something else)."""
    bad = []
    if hf.get("model_type", "llama") != "llama":
        bad.append(f"model_type={hf.get('model_type')!r} (only 'llama')")
    if hf.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf.get('hidden_act')!r} (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            bad.append(f"{key}=true (megaeff's projections have no bias)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        bad.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE)")
    return bad


def read_hf_config(path: str) -> Dict:
    """config.json of the directory `path`, after checking that the directory holds safetensors weights."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(FIELD, f"{path}: not a directory (a Hugging Face save_pretrained directory is expected)")
    config_file = root / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(FIELD, f"{path}: no {CONFIG_FILE}")
    if not (root / WEIGHTS_FILE).is_file() and not (root / WEIGHTS_INDEX).is_file():
        pickled = " (only pickled pytorch_model.bin, which is never loaded: re-save with safetensors)"
        has_bin = any(root.glob("pytorch_model*.bin"))
        raise ConfigError(FIELD, f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}" + (pickled if has_bin else ""))
    try:
        return json.loads(config_file.read_text())
    except ValueError as exc:
        raise ConfigError(FIELD, f"{config_file}: not valid JSON: {exc}") from None


def validate_init_from(m: ModelConfig) -> None:
    """The directory is a safetensors LLaMA checkpoint of exactly the configured shape."""
    if m.init_from is None:
        return
    if m.moe_experts:
        raise ConfigError(FIELD, "initializing an MoE model from a dense Hugging Face LLaMA is not supported")
    hf = read_hf_config(m.init_from)
    bad = _unsupported(hf)
    if bad:
        raise ConfigError(FIELD, f"{m.init_from}/{CONFIG_FILE}: unsupported {'; '.join(bad)}")
    diffs = hf_mismatches(m, hf)
    if diffs:
        raise ConfigError(
            FIELD,
            f"{m.init_from}/{CONFIG_FILE} does not match the configured model: {'; '.join(diffs)} "
            "(set these model.* fields to the checkpoint's values)",
        )
