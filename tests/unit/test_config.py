"""Config composition (Hydra + the typed schema) and cross-field validation."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import OmegaConfBaseException

from megaeff.config.schema import Config, DataConfig, ModelConfig, ParallelConfig
from megaeff.config.validate import validate_config
from megaeff.distributed.dims import ParallelDims
from megaeff.errors import ConfigError, MegaeffError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "method", "optim", "precision", "parallel", "data", "train", "logging", "experiment")


def all_group_options():
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def valid_config(**sections) -> Config:
    """A small config that passes validation; `sections` replace fields, e.g. model=dict(dim=130)."""
    cfg = Config()
    cfg.model = ModelConfig(name="t", dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=264, max_seq_len=128)
    cfg.data = DataConfig(seq_len=64)
    cfg.train.steps = 20
    cfg.optim.warmup_steps = 5
    cfg.parallel = ParallelConfig(tp=1, cp=1, dp=-1, pp=1)
    for section, values in sections.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return cfg


# ----------------------------------------------------------------------------- defaults
def test_default_config(compose_cfg):
    cfg = compose_cfg()
    assert isinstance(cfg, Config)
    m = cfg.model
    assert (m.name, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim) == ("tiny", 128, 4, 4, None, 352)
    assert (m.vocab_size, m.max_seq_len, m.norm_eps, m.init_std, m.attention_backend) == (264, 1024, 1e-6, 0.02, "auto")
    assert cfg.method.name == "dense"
    o = cfg.optim
    assert (o.name, o.lr, list(o.betas), o.warmup_steps, o.min_lr_ratio, o.schedule) == (
        "adamw", 3e-3, [0.9, 0.95], 30, 0.1, "cosine")
    assert cfg.precision.name == "fp32"
    assert (cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.dp, cfg.parallel.pp) == (1, 1, -1, 1)
    d = cfg.data
    assert (d.name, d.tokenizer, d.seq_len, list(d.valid_docs), d.cache_dir) == (
        "default", "byte", 256, ["hamlet", "the-tempest", "twelfth-night"], None)
    t = cfg.train
    assert (t.steps, t.micro_batch_size, t.grad_accum, t.seed, t.resume, t.eval_batch_size) == (300, 16, 1, 1234, "auto", 32)
    assert cfg.logging.backend == "jsonl" and cfg.logging.wandb_mode == "offline"
    assert cfg.name == "megaeff"
    assert cfg.run_dir.startswith("runs/")
    # The tiny model's vocabulary covers the byte tokenizer (257 ids).
    validate_config(cfg, world_size=1, tokenizer_vocab=257)


def test_overrides_are_typed(compose_cfg):
    cfg = compose_cfg(["model.dim=64", "train.steps=7", "optim.lr=0.5", "model.n_kv_heads=2"])
    assert cfg.model.dim == 64 and cfg.train.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.n_kv_heads == 2
    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose_cfg(["train.steps=many"])


# ----------------------------------------------------------------------------- compose-time errors
def test_unknown_key_fails_at_compose_time(compose_cfg):
    with pytest.raises((HydraException, OmegaConfBaseException)) as exc:
        compose_cfg(["model.dimm=3"], raw=True)
    assert "dimm" in str(exc.value)


def _compose_from(conf_dir: Path, overrides):
    from hydra import compose, initialize_config_dir

    from megaeff.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    "text",
    ["name: bad\ndim: 64\ndimm: 3\n", "name: bad\ndim: sixty-four\n"],
    ids=["misspelled-key", "wrong-type"],
)
def test_bad_group_file_fails_at_compose_time(tmp_path, text):
    """A group file with a key outside the schema (or a value of the wrong type) fails when composed."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "model" / "bad.yaml").write_text(text)
    assert _compose_from(conf, ["model=tiny"]).model.dim == 128  # the copy itself is fine
    with pytest.raises((HydraException, OmegaConfBaseException)):
        _compose_from(conf, ["model=bad"])


def test_unknown_group_option_fails_at_compose_time(compose_cfg):
    with pytest.raises(ConfigCompositionException) as exc:
        compose_cfg(["model=llama_nope"], raw=True)
    assert "llama_nope" in str(exc.value)


def test_experiment_is_selected_without_plus(compose_cfg):
    """`experiment=name` works with the `optional experiment: null` default; `+experiment=` is rejected."""
    cfg = compose_cfg(["experiment=smoke"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.data.seq_len, cfg.train.steps) == (32, 2, 32, 8)
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["+experiment=smoke"], raw=True)


@pytest.mark.parametrize("experiment,steps,warmup", [("smoke", 8, 2), ("shakespeare_9m", 1500, 100)])
def test_experiment_values_win_over_root_config(compose_cfg, experiment, steps, warmup):
    """Keys the root config.yaml also sets (name) must come from the experiment file."""
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.name == experiment
    assert (cfg.train.steps, cfg.optim.warmup_steps) == (steps, warmup)
    # Command-line overrides still win over the experiment.
    overridden = compose_cfg([f"experiment={experiment}", "name=mine", "train.steps=3"])
    assert (overridden.name, overridden.train.steps) == ("mine", 3)


# ----------------------------------------------------------------------------- every file composes
@pytest.mark.parametrize("group,option", all_group_options(), ids=lambda x: str(x))
def test_every_yaml_composes_and_validates(group, option, compose_cfg):
    # data=indexed leaves its dataset paths to the user (???).
    extra = ["data.paths=[/data/corpus_text_document]"] if (group, option) == ("data", "indexed") else []
    # Per-size method presets (sltrain_60m, ...) carry the published ranks: compose them with their model size.
    if group == "parallel" and "interleaved" in option:
        extra.append("train.grad_accum=4")  # the schedule needs micro-batches divisible by pp
    sized = group == "method" and "_" in option
    if sized:
        extra.append(f"model=llama_{option.split('_', 1)[1]}")
    cfg = compose_cfg([f"{group}={option}", *extra])
    assert isinstance(cfg, Config)
    if group in ("model", "method", "precision", "optim", "data"):
        # These group files name themselves after the file (method presets after the method they configure).
        assert getattr(cfg, group).name == (option.split("_", 1)[0] if sized else option)
    # Parallel presets name their degrees: validate each at the world size it asks for (-1 takes one rank).
    world = 1
    if group == "parallel":
        for axis in ("tp", "cp", "dp", "pp"):
            world *= max(getattr(cfg.parallel, axis), 1)
    validate_config(cfg, world_size=world, tokenizer_vocab=257)
    ParallelDims.from_config(cfg.parallel, world)


def test_conf_groups_exist():
    for group in GROUPS:
        assert list((CONF_DIR / group).glob("*.yaml")), group
    assert (CONF_DIR / "config.yaml").is_file()


# ----------------------------------------------------------------------------- validate_config
def test_valid_config_passes():
    assert validate_config(valid_config(), world_size=4, tokenizer_vocab=257) is None


@pytest.mark.parametrize(
    "sections,field,kwargs",
    [
        (dict(model=dict(dim=66)), "model.dim", {}),  # 66 % 4 != 0
        (dict(model=dict(dim=36, n_heads=4)), "model.dim", {}),  # head dim 9 is odd
        (dict(model=dict(n_kv_heads=3)), "model.n_kv_heads", {}),
        (dict(model=dict(n_kv_heads=0)), "model.n_kv_heads", {}),
        (dict(model=dict(n_layers=0)), "model.n_layers", {}),
        (dict(model=dict(attention_backend="xformers")), "model.attention_backend", {}),
        (dict(data=dict(seq_len=256)), "data.seq_len", {}),  # > max_seq_len=128
        (dict(model=dict(vocab_size=100)), "model.vocab_size", {"tokenizer_vocab": 257}),
        (dict(precision=dict(name="fp8")), "precision.name", {}),
        (dict(method=dict(name="sltrain_nope")), "method.name", {}),
        (dict(optim=dict(warmup_steps=21)), "optim.warmup_steps", {}),  # > train.steps=20
        (dict(optim=dict(warmup_steps=-1)), "optim.warmup_steps", {}),
        (dict(optim=dict(betas=[0.9, 1.0])), "optim.betas", {}),
        (dict(optim=dict(min_lr_ratio=1.5)), "optim.min_lr_ratio", {}),
        (dict(optim=dict(schedule="linear")), "optim.schedule", {}),
        (dict(optim=dict(name="sgd")), "optim.name", {}),
        (dict(optim=dict(second_moment="e3m4")), "optim.second_moment", {}),
        (dict(optim=dict(fp8_backend="cutlass")), "optim.fp8_backend", {}),
        (dict(optim=dict(min_fp8_numel=-1)), "optim.min_fp8_numel", {}),
        (dict(precision=dict(fp8_activations=True)), "precision.fp8_activations", {}),  # needs precision=coat
        (dict(precision=dict(name="coat", act_group_size=24)), "precision.act_group_size", {}),
        (dict(train=dict(micro_batch_size=0)), "train.micro_batch_size", {}),
        (dict(train=dict(eval_interval=-1)), "train.eval_interval", {}),
        (dict(logging=dict(backend="tensorboard")), "logging.backend", {}),
        (dict(parallel=dict(dp=-1, pp=-1)), "parallel.pp", {}),
        (dict(parallel=dict(dp=-1, tp=-1)), "parallel.dp", {}),
        (dict(parallel=dict(cp=0)), "parallel.cp", {}),
        (dict(parallel=dict(dp=2)), "parallel", {"world_size": 4}),
        (dict(parallel=dict(dp=-1, pp=3)), "parallel.dp", {"world_size": 4}),
    ],
)
def test_validate_config_names_field(sections, field, kwargs):
    cfg = valid_config(**sections)
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg, **kwargs)
    assert exc.value.field == field
    assert f"'{field}'" in str(exc.value)
    assert isinstance(exc.value, MegaeffError)


def test_vocab_check_only_with_tokenizer_vocab():
    cfg = valid_config(model=dict(vocab_size=100))
    validate_config(cfg)  # no tokenizer given: no vocabulary check
    validate_config(valid_config(model=dict(vocab_size=257)), tokenizer_vocab=257)  # equal is fine


def test_world_size_mismatch_via_parallel_dims():
    with pytest.raises(ConfigError) as exc:
        ParallelDims.from_config(ParallelConfig(tp=1, cp=1, dp=2, pp=1), world_size=3)
    assert exc.value.field == "parallel"
    assert "world size is 3" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        ParallelDims.from_config(ParallelConfig(tp=1, cp=1, dp=-1, pp=2), world_size=3)
    assert exc.value.field == "parallel.dp"


def test_two_wild_degrees_in_parallel_dims():
    with pytest.raises(ConfigError) as exc:
        ParallelDims.from_config(ParallelConfig(tp=-1, cp=1, dp=-1, pp=1), world_size=4)
    assert exc.value.field == "parallel.dp"


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.moe_experts=-1"], "model.moe_experts"),
        (["model.moe_experts=4", "model.moe_top_k=5"], "model.moe_top_k"),
        (["model.moe_experts=4", "model.moe_aux_loss_coef=-0.1"], "model.moe_aux_loss_coef"),
        (["model.moe_experts=4", "parallel.expert_impl=ep", "optim=coat_adamw"], "parallel.expert_impl"),
        (["model.moe_experts=4", "parallel.expert_impl=fssdp", "method=sltrain", "method.rank=8", "optim.weight_decay=0.1"],
         "parallel.expert_impl"),
        (["model.moe_experts=4", "parallel.expert_impl=star"], "parallel.expert_impl"),
    ],
)
def test_moe_config_errors_name_the_field(compose_cfg, overrides, field):
    with pytest.raises(ConfigError) as exc:
        validate_config(compose_cfg(overrides), world_size=1)
    assert exc.value.field == field


def test_moe_trains_with_data_parallelism_only(compose_cfg):
    with pytest.raises(ConfigError) as exc:
        validate_config(compose_cfg(["model.moe_experts=4", "parallel=tp2"]), world_size=2)
    assert exc.value.field == "model.moe_experts"
