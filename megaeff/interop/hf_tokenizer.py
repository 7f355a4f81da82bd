"""The tokenizer a model was trained with, written into its Hugging Face export so the directory is self-contained.

- `byte` (megaeff/data/tokenizer.py: token = UTF-8 byte, 256 = end of document) becomes a `tokenizers` BPE with
  the 256 byte symbols of the GPT-2 byte-level alphabet as its vocabulary, id = byte value, no merges, and the end
  of document `<|endoftext|>` as id 256. With no merges no text can ever produce id 256, and
  `split_special_tokens` keeps transformers from matching `<|endoftext|>` written in the text: every text encodes
  to exactly its UTF-8 bytes, as megaeff encodes it, through `tokenizers` and `transformers.AutoTokenizer` alike.
- `hf`: a `save_pretrained` directory is copied file by file; a lone `tokenizer.json` is copied with a
  `tokenizer_config.json` naming its end-of-sequence token.
- `sentencepiece`: the `.model` is copied as `tokenizer.model` with a `tokenizer_config.json` for transformers'
  LlamaTokenizer (no BOS/EOS added, as megaeff encodes). Transformers converts the model to its own tokenizer on
  load, which reproduces sentencepiece's ids for LLaMA-style models (identity normalization, byte fallback);
  for others use the copied `tokenizer.model` with sentencepiece itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, List, NamedTuple, Optional

from megaeff.data.bpe import bytes_to_unicode
from megaeff.data.tokenizer import PATH_FIELD, ByteTokenizer, build_tokenizer
from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.config.data import DataConfig

BYTE_EOS = "<|endoftext|>"
# What `save_pretrained` of a tokenizer may write; whichever exist are copied.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class TokenizerInfo(NamedTuple):
    files: List[str]
    eos_id: Optional[int]
    bos_id: Optional[int]


def write_byte_tokenizer(out_dir: Path, model_max_length: int) -> List[str]:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ConfigError(
            "data.tokenizer", "exporting the byte tokenizer needs tokenizers: pip install 'megaeff[hf]'"
        ) from None
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab[BYTE_EOS] = ByteTokenizer.eod_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": BYTE_EOS,
        "bos_token": BYTE_EOS,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def _copy_hf(path: Path, out_dir: Path, eos_id: Optional[int], model_max_length: int) -> List[str]:
    if path.is_dir():
        files = [name for name in HF_TOKENIZER_FILES if (path / name).is_file()]
        for name in files:
            shutil.copyfile(path / name, out_dir / name)
        return files
    from tokenizers import Tokenizer

    shutil.copyfile(path, out_dir / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length}
    if eos_id is not None:
        config["eos_token"] = Tokenizer.from_file(str(path)).id_to_token(eos_id)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def _copy_sentencepiece(path: Path, out_dir: Path, model_max_length: int) -> List[str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    shutil.copyfile(path, out_dir / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False}
    config["model_max_length"] = model_max_length
    for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
        if i >= 0:
            config[key] = sp.id_to_piece(i)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.model", "tokenizer_config.json"]


def write_tokenizer(dcfg: DataConfig, out_dir: Path, model_max_length: int) -> TokenizerInfo:
    """Write the tokenizer of data config `dcfg` into `out_dir`; returns the files and the EOS/BOS ids."""
    tok = build_tokenizer(dcfg.tokenizer, dcfg.tokenizer_path)  # fails naming data.tokenizer_path if it is gone
    try:
        eos = tok.eod_id
    except ConfigError:
        eos = None
    if dcfg.tokenizer == "byte":
        return TokenizerInfo(write_byte_tokenizer(out_dir, model_max_length), eos, eos)
    path = Path(dcfg.tokenizer_path)
    if dcfg.tokenizer == "hf":
        return TokenizerInfo(_copy_hf(path, out_dir, eos, model_max_length), eos, None)
    if dcfg.tokenizer == "sentencepiece":
        return TokenizerInfo(_copy_sentencepiece(path, out_dir, model_max_length), eos, None)
    raise ConfigError(PATH_FIELD, f"no export rule for tokenizer {dcfg.tokenizer!r}")
