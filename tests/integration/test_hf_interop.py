"""Hugging Face interop (megaeff/interop/): export to a LlamaForCausalLM directory that `transformers` loads with the
same logits, the training tokenizer written beside it, and `model.init_from` starting a run from a
`transformers`-made checkpoint (dense: at the Hugging Face model's own loss; lowrank/sltrain/lost: converted,
with each projection's reconstruction error logged), single-process and on two gloo ranks.

Tolerance of the logit comparisons, 1e-5 relative to the largest logit (the issue's bound). Both sides compute
in fp32 (unit roundoff 6e-8). For dense the operations are the same and the difference is 0. For the factored
methods transformers computes each projection as one GEMM with the exported W, megaeff through its factors
(x A^T then B^T, or SLTrain's sparse product), so every projection output differs by the rounding of sums of at
most 64 + r terms: <= ~70 x 6e-8 = 4e-6 worst case per projection, ~1e-7 typically, and two blocks keep it
below 1e-5. A wrong export (no SLTrain scale, q/k rows permuted as a Meta -> HF conversion would) moves the
logits by 1e-2 or more, which `test_a_wrong_export_fails_the_tolerance` checks.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from megaeff.data.corpus import load_plays
from megaeff.data.tokenizer import ByteTokenizer, build_tokenizer
from megaeff.errors import CheckpointError, ConfigError
from megaeff.interop.hf_export import export_hf
from megaeff.interop.hf_import import import_hf, pretrained_weights
from megaeff.interop.layers import build_layer, layer_specs, layer_state, logical_model
from megaeff.layers.lost import channel_count, lost_decompose
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama
from tests.helpers import compose, records, train

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5  # see the module docstring
SHAPE = ["experiment=smoke", "model.n_heads=4", "model.n_kv_heads=2"]  # dim 32, ffn 64, 2 layers, GQA 4/2
METHODS = {
    "dense": ["method=dense"],
    "lowrank": ["method=lowrank", "method.rank=8"],
    # The compact path (not W), and alpha / r = 2, so that a missing scale shows.
    "sltrain": ["method=sltrain", "method.rank=8", "method.alpha=16", "method.sltrain_path=sparse"],
    "lost_identity": ["method=lost", "method.rank=8", "method.lost_act=none", "method.lost_channel_ratio=0.1"],
    "lost_silu": ["method=lost", "method.rank=8", "method.lost_act=silu", "method.lost_channel_ratio=0.1"],
}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tokens():
    """4 x 64 byte tokens of the built-in corpus."""
    text = load_plays()["hamlet"][:20000]
    return torch.tensor(ByteTokenizer().encode(text)[: 4 * 64]).view(4, 64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-made LLaMA of the smoke shape: init std 0.2 and random norm gains, so that its loss is far
    from that of megaeff's own init (and a norm that failed to load would show)."""
    torch.manual_seed(0)
    hcfg = transformers.LlamaConfig(
        vocab_size=264,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(hcfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(str(path))
    return path


def seeded_model(cfg, init=None):
    """The configured model as the trainer initializes it (`init`: model.init_from's weights for LOST)."""
    model = build_llama(cfg.model, cfg.method)
    return materialize(model, torch.device("cpu"), cfg.train.seed, cfg.model.init_std, init).eval()


def trained_model(cfg):
    """The configured model from the seed, moved away from its init (as training would: SLTrain's B leaves 0)."""
    model = seeded_model(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def load_hf(path, custom: bool):
    if custom:
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()
    return transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("method", list(METHODS))
def test_export_loads_in_transformers_with_the_same_logits(method, tokens, tmp_path):
    cfg = compose([*SHAPE, *METHODS[method]])
    model = trained_model(cfg)
    with torch.no_grad():
        ref = model(tokens)
    # A small shard limit for one method: the index file path must load too.
    shard = "20KB" if method == "lowrank" else "5GB"
    result = export_hf(model.state_dict(), cfg, tmp_path / "out", max_shard_size=shard)
    assert result.custom_code == (method == "lost_silu")
    hf = load_hf(tmp_path / "out", result.custom_code)
    assert type(hf).__name__ == ("MegaeffLostLlamaForCausalLM" if result.custom_code else "LlamaForCausalLM")
    with torch.no_grad():
        got = hf(tokens).logits
    diff = float((got - ref).abs().max())
    print(f"\n[hf-export] {method}: max |logit diff| {diff:.3e}, relative {rel_diff(got, ref):.3e}")
    assert rel_diff(got, ref) <= REL_TOL
    if method == "lowrank":
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and len(index["weight_map"]) == len(hf.state_dict())


def test_a_wrong_export_fails_the_tolerance(tokens, tmp_path):
    """The comparison can fail: SLTrain exported without its alpha / r scale, or q/k rows permuted as a Meta ->
    HF conversion (for interleaved RoPE) would, is far outside the tolerance."""
    from megaeff.layers.sltrain_ops import densify

    cfg = compose([*SHAPE, *METHODS["sltrain"]])
    model = trained_model(cfg)
    with torch.no_grad():
        ref = model(tokens)
    export_hf(model.state_dict(), cfg, tmp_path / "out")
    hf = load_hf(tmp_path / "out", False)
    layer = model.layers[0].mlp.up
    proj = hf.model.layers[0].mlp.up_proj
    with torch.no_grad():
        assert rel_diff(hf(tokens).logits, ref) <= REL_TOL
        kept = proj.weight.clone()
        proj.weight.copy_(densify(layer.A, layer.B, layer.sparse_values, layer.sparse_index, 1.0, torch.float32))
        no_scale = rel_diff(hf(tokens).logits, ref)
        proj.weight.copy_(kept)
        head_dim = cfg.model.dim // cfg.model.n_heads
        for block, name in itertools.product(hf.model.layers, ("q_proj", "k_proj")):
            w = getattr(block.self_attn, name).weight  # Meta -> HF: rows (pairs) -> (halves) within each head
            w.copy_(w.view(-1, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape))
        permuted = rel_diff(hf(tokens).logits, ref)
    print(f"\n[hf-export] wrong exports: no SLTrain scale {no_scale:.3e}, permuted q/k {permuted:.3e} (relative)")
    assert no_scale > 100 * REL_TOL and permuted > 100 * REL_TOL


def test_moe_export_is_refused(tmp_path):
    cfg = compose([*SHAPE, "model.moe_experts=2"])
    with pytest.raises(ConfigError, match="model.moe_experts"):
        export_hf({}, cfg, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- tokenizer
TEXTS = [
    "To be, or not to be, that is the question:",
    "Ça va? Größe — naïve 東京 🎭\nline two",
    "  leading spaces and\ttabs\n\n",
    "<|endoftext|> written in the text stays bytes",
    "",
]


def test_byte_tokenizer_exports_as_an_equivalent_tokenizer_json(tmp_path):
    cfg = compose(SHAPE)
    model = trained_model(cfg)
    export_hf(model.state_dict(), cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ours = ByteTokenizer()
    reloaded = build_tokenizer("hf", str(tmp_path / "out"))  # megaeff reading the export back
    for text in [*TEXTS, load_plays()["hamlet"][:5000]]:
        ids = ours.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids == reloaded.encode(text)
        assert hf_tok(text)["input_ids"] == ids  # no BOS/EOS added either
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == ours.eod_id == reloaded.eod_id == config["eos_token_id"]
    assert len(hf_tok) == ours.vocab_size <= config["vocab_size"]


def test_hf_tokenizer_file_is_copied(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megaeff.interop.hf_tokenizer import write_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(load_plays()["hamlet"][:20000].splitlines(), trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    dcfg = compose(["data.tokenizer=hf", f"data.tokenizer_path={tmp_path / 'tokenizer.json'}"]).data
    (tmp_path / "out").mkdir()
    info = write_tokenizer(dcfg, tmp_path / "out", 1024)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ours = build_tokenizer("hf", str(tmp_path / "tokenizer.json"))
    for text in TEXTS[:3]:
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf_tok.eos_token_id == ours.eod_id == info.eos_id


def test_sentencepiece_model_is_copied(tmp_path):
    """A LLaMA-style SentencePiece model (identity normalization, byte fallback) is copied as tokenizer.model, and
    transformers' conversion of it encodes the corpus as sentencepiece does."""
    import sentencepiece

    from megaeff.interop.hf_tokenizer import write_tokenizer

    text = load_plays()["hamlet"][:20000]
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    llama_style = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True)
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        minloglevel=2, **llama_style,
    )  # fmt: skip
    model = tmp_path / "sp.model"
    dcfg = compose(["data.tokenizer=sentencepiece", f"data.tokenizer_path={model}"]).data
    (tmp_path / "out").mkdir()
    info = write_tokenizer(dcfg, tmp_path / "out", 1024)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == model.read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ours = build_tokenizer("sentencepiece", str(model))
    for sample in (text[:3000], TEXTS[0], TEXTS[1]):
        assert hf_tok.encode(sample, add_special_tokens=False) == ours.encode(sample)
    assert hf_tok.eos_token_id == ours.eod_id == info.eos_id


# ---------------------------------------------------------------------------------------------------- import
def test_import_conversions(hf_dir, tokens):
    """dense: the transformers model exactly; lowrank: the Eckart-Young error; sltrain: W0 exactly on the support
    and a smaller error than lowrank; lost: the layer's own SVD init of W0, whose channel set differs from the
    seed's (so the init must be redone from W0, as the trainer does)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    cfg = compose([*SHAPE, "method=dense", f"model.init_from={hf_dir}"])
    result = import_hf(str(hf_dir), cfg)
    model = build_llama(cfg.model, cfg.method, device="cpu")
    model.load_state_dict(result.state)
    model.reset_buffers()
    with torch.no_grad():
        assert torch.equal(model(tokens), hf(tokens).logits)
    W0 = pretrained_weights(str(hf_dir))["layers.1.mlp.down.weight"].double()
    S = torch.linalg.svdvals(W0)
    errors = {}
    for method in ("lowrank", "sltrain", "lost_identity"):
        cfg = compose([*SHAPE, *METHODS[method], f"model.init_from={hf_dir}"])
        errors[method] = import_hf(str(hf_dir), cfg).errors
    eckart_young = float(S[8:].norm() / S.norm())
    assert errors["lowrank"]["layers.1.mlp.down"] == pytest.approx(eckart_young, rel=1e-6)
    assert all(errors["sltrain"][n] < errors["lowrank"][n] for n in errors["lowrank"])
    cfg = compose([*SHAPE, *METHODS["sltrain"], f"model.init_from={hf_dir}"])
    spec = next(s for s in layer_specs(logical_model(cfg)) if s.name == "layers.1.mlp.down")
    sl = build_layer(cfg, spec)
    sl.load_state_dict(layer_state(import_hf(str(hf_dir), cfg).state, spec.name))
    on_support = sl.sparse_index.long()
    torch.testing.assert_close(
        sl.dense_weight().view(-1)[on_support].double(), W0.view(-1)[on_support], rtol=0, atol=1e-6
    )
    cfg = compose([*SHAPE, *METHODS["lost_identity"], f"model.init_from={hf_dir}"])
    state = import_hf(str(hf_dir), cfg).state
    split = lost_decompose(W0.float(), 8, channel_count(64, 0.1))  # LOST's own init of the pretrained W0
    assert torch.equal(state["layers.1.mlp.down.B"], split.B.float())
    assert torch.equal(state["layers.1.mlp.down.sparse_weight"], split.sparse)
    seeded = seeded_model(cfg)
    checksums = [k for k in state if k.endswith("index_checksum")]
    assert any(int(state[k]) != int(seeded.state_dict()[k]) for k in checksums)
    print(f"\n[init_from] reconstruction errors: {json.dumps(errors, indent=1)}")


def test_init_from_config_checks(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_from.*model\.dim=64 vs hidden_size=32.*model\.n_layers"):
        compose([*SHAPE, "model.dim=64", "model.n_layers=3", f"model.init_from={hf_dir}"])
    with pytest.raises(ConfigError, match="model.init_from.*no config.json"):
        compose([*SHAPE, f"model.init_from={tmp_path}"])
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickled pytorch_model.bin"):
        compose([*SHAPE, f"model.init_from={tmp_path}"])
    cfg = compose([*SHAPE, f"model.init_from={hf_dir}"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(264, 32)}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor for layers.0.attention_norm.weight|no tensor for norm"):
        import_hf(str(bad), cfg)
    # A tied checkpoint (no lm_head.weight) gives the head the embedding.
    (bad / "config.json").write_text(
        json.dumps({**json.loads((hf_dir / "config.json").read_text()), "tie_word_embeddings": True})
    )
    tied = pretrained_weights(str(bad))
    assert torch.equal(tied["output.weight"], tied["tok_embeddings.weight"])


# ---------------------------------------------------------------------------------------------------- runs
def first_batch_losses(hf_dir, overrides):
    """Losses on the trainer's first batch (the same data build and sample order): the Hugging Face model's, the
    imported megaeff model's (built as the trainer builds it) and, for contrast, megaeff's own init's."""
    from megaeff.data.builder import BuildContext, build_data
    from megaeff.data.sampler import IGNORE_INDEX, GlobalSampleOrder, micro_batch_indices

    cfg = compose(overrides)
    t = cfg.train
    data = build_data(cfg.data, BuildContext(t.steps * t.micro_batch_size * t.grad_accum, t.seed, True, lambda: None))
    order = GlobalSampleOrder(len(data.train), t.seed, shuffle=False)
    (ix,) = micro_batch_indices(order, 0, t.micro_batch_size, 1, 0, 1)
    batch = data.train.batch(ix)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    imported = seeded_model(cfg, pretrained_weights(str(hf_dir)) if cfg.method.name == "lost" else None)
    imported.load_state_dict(import_hf(str(hf_dir), cfg).state)

    def loss(logits):
        return float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX))

    with torch.no_grad():
        x = batch["inputs"]
        return {"hf": loss(hf(x).logits), "imported": loss(imported(x)), "own": loss(seeded_model(cfg)(x))}


def run_overrides(hf_dir, *extra):
    return [
        *SHAPE,
        f"model.init_from={hf_dir}",
        "train.log_interval=1",
        "optim.warmup_steps=1",
        "train.plot=false",
        *extra,
    ]


def logged_errors(out: str):
    return {line.split()[1]: float(line.split()[2]) for line in out.splitlines() if line.startswith("init_from:   ")}


@pytest.mark.slow  # megaeff-train subprocesses
def test_init_from_dense_starts_at_the_hf_loss(hf_dir, tmp_path):
    overrides = run_overrides(hf_dir, "method=dense", "train.steps=1")
    ref = first_batch_losses(hf_dir, overrides)
    hf_loss, own_loss = ref["hf"], ref["own"]
    train(tmp_path / "run", *overrides)
    first = records(tmp_path / "run")[0]
    print(
        f"\n[init_from] dense: first loss {first['loss']:.6f}, HF loss {hf_loss:.6f} "
        f"(megaeff's own init {own_loss:.4f})"
    )
    assert first["step"] == 1 and first["loss"] == pytest.approx(hf_loss, rel=REL_TOL)
    assert abs(own_loss - hf_loss) > 0.1  # the comparison is not between two near-uniform models


@pytest.mark.slow  # megaeff-train subprocesses
@pytest.mark.parametrize("method", ["sltrain", "lost_silu"])
def test_init_from_converts_and_logs_the_errors(method, hf_dir, tmp_path):
    """The logged errors are the import's; LOST resumes from its checkpoint (its channel set, regenerated from
    model.init_from's W0, matches the checkpoint's checksum), and its checkpoint exports through megaeff-convert."""
    overrides = run_overrides(hf_dir, *METHODS[method])
    out = train(tmp_path / "run", *overrides, "train.steps=1")
    ref = first_batch_losses(hf_dir, [*overrides, "train.steps=1"])
    assert records(tmp_path / "run")[0]["loss"] == pytest.approx(ref["imported"], rel=REL_TOL)
    expected = import_hf(str(hf_dir), compose(overrides)).errors
    assert logged_errors(out) == pytest.approx(expected, rel=1e-6) and len(expected) == 14
    assert json.loads((tmp_path / "run" / "init_from.json").read_text())["errors"] == pytest.approx(expected)
    print(f"\n[init_from] {method}: errors {min(expected.values()):.4f} .. {max(expected.values()):.4f}")
    if method != "lost_silu":
        return
    resumed = train(tmp_path / "run", *overrides, "train.steps=2", "train.resume=auto")
    assert "resumed from" in resumed and "init_from:" not in resumed
    from megaeff.cli.convert import main as convert
    from megaeff.train.checkpoint import find_resume_dir, read_logical_checkpoint

    ckpt = find_resume_dir(tmp_path / "run", "auto")
    convert(["hf-export", str(ckpt), str(tmp_path / "export")])
    cfg = compose(overrides)
    model = seeded_model(cfg, pretrained_weights(str(hf_dir)))
    model.load_state_dict(read_logical_checkpoint(ckpt)["model"])
    tokens = torch.tensor(ByteTokenizer().encode(load_plays()["hamlet"][:300])[:256]).view(4, 64)
    with torch.no_grad():
        ref, got = model.eval()(tokens), load_hf(tmp_path / "export", True)(tokens).logits
    assert rel_diff(got, ref) <= REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dense", "lost_silu"])
def test_init_from_on_two_tensor_parallel_ranks(method, hf_dir, tmp_path):
    """tp2 takes its shards of the imported state (and, for LOST, derives the channels from W0 on both ranks):
    the first loss is the single-process imported model's, and for dense the HF model's."""
    overrides = run_overrides(hf_dir, *METHODS[method], "train.steps=1")
    ref = first_batch_losses(hf_dir, overrides)
    out = train(tmp_path / "tp2", *overrides, "parallel=tp2", nproc=2)
    first = records(tmp_path / "tp2")[0]["loss"]
    print(
        f"\n[init_from] tp2 {method}: first loss {first:.6f}, single-process {ref['imported']:.6f}, HF {ref['hf']:.6f}"
    )
    assert first == pytest.approx(ref["imported"], rel=REL_TOL)
    if method == "dense":
        assert first == pytest.approx(ref["hf"], rel=REL_TOL)
    assert len(logged_errors(out)) == 14
    assert math.isfinite(records(tmp_path / "tp2")[0]["grad_norm"])
