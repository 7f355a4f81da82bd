"""Config composition (Hydra + the typed schema) and cross-field validation."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import OmegaConfBaseException

from megaeff.config import Choice, compose_raw, to_config
from megaeff.config.compose import relax_preset_warmup
from megaeff.config.optim import warmup_steps_for
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
    assert (o.name, o.lr, list(o.betas), o.warmup_steps, o.warmup_fraction, o.min_lr_ratio, o.schedule) == (
        "adamw",
        3e-3,
        [0.9, 0.95],
        None,  # warmup_fraction of train.steps: 30 of 300
        0.1,
        0.1,
        "cosine",
    )
    assert warmup_steps_for(o, cfg.train.steps) == 30
    assert cfg.precision.name == "fp32"
    assert (cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.dp, cfg.parallel.pp) == (1, 1, -1, 1)
    d = cfg.data
    assert (d.name, d.tokenizer, d.seq_len, list(d.valid_docs), d.cache_dir) == (
        "default",
        "byte",
        256,
        ["hamlet", "the-tempest", "twelfth-night"],
        None,
    )
    t = cfg.train
    assert (t.steps, t.micro_batch_size, t.grad_accum, t.seed, t.resume, t.eval_batch_size) == (
        300,
        16,
        1,
        1234,
        "auto",
        32,
    )
    assert cfg.logging.backend == "jsonl" and cfg.logging.wandb_mode == "offline"
    assert cfg.name == "megaeff"
    assert cfg.run_dir.startswith("runs/")
    # The tiny model's vocabulary covers the byte tokenizer (257 ids).
    validate_config(cfg, world_size=1, tokenizer_vocab=257)


def test_overrides_are_typed(compose_cfg):
    cfg = compose_cfg(["model.dim=64", "train.steps=7", "optim.warmup_steps=5", "optim.lr=0.5", "model.n_kv_heads=2"])
    assert cfg.model.dim == 64 and cfg.train.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.n_kv_heads == 2
    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose_cfg(["train.steps=many"])


# ----------------------------------------------------------------------------- compose-time errors
def test_unknown_key_fails_at_compose_time(compose_cfg):
    with pytest.raises((HydraException, OmegaConfBaseException)) as exc:
        compose_cfg(["model.dimm=3"], raw=True)
    assert "dimm" in str(exc.value)


def _compose_from(conf_dir: Path, overrides):
    return compose_raw(overrides, config_dir=str(conf_dir))


@pytest.mark.parametrize(
    "text",
    ["name: bad\ndim: 64\ndimm: 3\n", "name: bad\ndim: sixty-four\n", "name: bad\nattention_backend: xformers\n"],
    ids=["misspelled-key", "wrong-type", "bad-choice"],
)
def test_bad_group_file_fails_at_compose_time(tmp_path, text):
    """A group file with a key outside the schema (or a value of the wrong type) fails when composed."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "model" / "bad.yaml").write_text(text)
    assert _compose_from(conf, ["model=tiny"]).model.dim == 128  # the copy itself is fine
    with pytest.raises((HydraException, OmegaConfBaseException)):
        _compose_from(conf, ["model=bad"])


@pytest.mark.parametrize(
    "override,group,listed", [("model=llama_nope", "model", "llama_60m"), ("experiment=smok", "experiment", "smoke")]
)
def test_unknown_group_option_names_the_options(compose_cfg, override, group, listed):
    """A misspelled option is refused in one line listing the real ones; `experiment` (once an optional group,
    whose typo silently ran the default config: issue 18 item 4) included."""
    with pytest.raises(ConfigError) as exc:
        compose_cfg([override], raw=True)
    assert exc.value.field == group and override.split("=")[1] in str(exc.value) and listed in str(exc.value)
    with pytest.raises(ConfigError, match="smok"):  # a sweep's options are checked one by one
        compose_cfg(["experiment=smoke,smok"], raw=True)


def test_experiment_is_selected_without_plus(compose_cfg):
    """`experiment=name` works with the `experiment: null` default; `+experiment=` is rejected."""
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
    overridden = compose_cfg([f"experiment={experiment}", "name=mine", "train.steps=2000"])
    assert (overridden.name, overridden.train.steps) == ("mine", 2000)


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
        # These group files name themselves after the file (method presets after the method they configure, and
        # precision variants such as coat_bf16, COAT on BF16 autocast, after the recipe they vary).
        variant = sized or (group == "precision" and "_" in option)
        assert getattr(cfg, group).name == (option.split("_", 1)[0] if variant else option)
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
        # Non-finite values fail every comparison, so `x <= 0` alone let them through (issue 18).
        (dict(optim=dict(lr=float("nan"))), "optim.lr", {}),
        (dict(optim=dict(lr=float("inf"))), "optim.lr", {}),
        (dict(optim=dict(eps=-1.0)), "optim.eps", {}),
        (dict(optim=dict(weight_decay=float("nan"))), "optim.weight_decay", {}),
        (dict(optim=dict(grad_clip=float("nan"))), "optim.grad_clip", {}),
        (dict(optim=dict(warmup_steps=None, warmup_fraction=1.5)), "optim.warmup_fraction", {}),
        (dict(model=dict(init_std=float("nan"))), "model.init_std", {}),
        (dict(model=dict(rope_theta=0.0)), "model.rope_theta", {}),
        (dict(train=dict(seed=-1)), "train.seed", {}),
        (dict(train=dict(device="foo")), "train.device", {}),
        (dict(train=dict(nonfinite="ignore")), "train.nonfinite", {}),
        (dict(train=dict(nonfinite_max_consecutive=0)), "train.nonfinite_max_consecutive", {}),
        (dict(train=dict(collective_timeout_s=float("inf"))), "train.collective_timeout_s", {}),
        (dict(train=dict(hang_timeout_s=0.0)), "train.hang_timeout_s", {}),
    ],
)
def test_validate_config_names_field(sections, field, kwargs):
    cfg = valid_config(**sections)
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg, **kwargs)
    assert exc.value.field == field
    assert f"'{field}'" in str(exc.value)
    assert isinstance(exc.value, MegaeffError)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3"])
def test_devices_that_pass(device):
    validate_config(valid_config(train=dict(device=device)))


def test_shortened_run_adapts_the_default_warmup(compose_cfg):
    """`megaeff-train train.steps=20` was refused by the default warmup of 30 steps (issue 18): an unset
    warmup is a fraction of the steps; a warmup the user sets beyond the steps is still an error."""
    assert warmup_steps_for(compose_cfg(["train.steps=20"]).optim, 20) == 2
    with pytest.raises(ConfigError, match="exceeds train.steps=20") as exc:
        compose_cfg(["train.steps=20", "optim.warmup_steps=30"])
    assert exc.value.field == "optim.warmup_steps"


def test_preset_warmup_gives_way_to_a_shorter_run(compose_cfg):
    """An experiment's warmup (shakespeare_9m: 100 steps) longer than `train.steps` set on the command line falls
    back to warmup_fraction with a warning; the same value typed by the user is refused."""
    overrides = ["experiment=shakespeare_9m", "train.steps=50"]
    raw = compose_cfg(overrides, raw=True)
    note = relax_preset_warmup(raw, overrides)
    assert "optim.warmup_steps=100" in note and "train.steps=50" in note
    cfg = to_config(raw)
    assert cfg.optim.warmup_steps is None and warmup_steps_for(cfg.optim, 50) == 5
    assert relax_preset_warmup(compose_cfg(["experiment=shakespeare_9m"], raw=True), []) is None  # fits: untouched
    typed = overrides + ["optim.warmup_steps=100"]
    raw = compose_cfg(typed, raw=True)
    assert relax_preset_warmup(raw, typed) is None
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        to_config(raw)


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
        (
            [
                "model.moe_experts=4",
                "parallel.expert_impl=fssdp",
                "method=sltrain",
                "method.rank=8",
                "optim.weight_decay=0.1",
            ],
            "parallel.expert_impl",
        ),
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


# ----------------------------------------------------------------------------- choices (enums)
def _choice_fields():
    """(dotted key, Choice enum) of every choice field in the schema."""
    out = []
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.type):
            for f in dataclasses.fields(section.type):
                if isinstance(f.type, type) and issubclass(f.type, Choice):
                    out.append((f"{section.name}.{f.name}", f.type))
    return out


def test_choices_behave_like_their_strings():
    import json
    import pickle

    from megaeff.config.choices import PpSchedule

    s = PpSchedule("1f1b")
    assert s is PpSchedule["1f1b"] and s == "1f1b" and s != "gpipe" and s in ("gpipe", "1f1b")
    assert hash(s) == hash("1f1b") and {"1f1b": 1}[s] == 1 and {s: 2}["1f1b"] == 2
    assert (str(s), f"{s}", f"{s:>6}", "%s" % s, repr(s)) == ("1f1b", "1f1b", "  1f1b", "1f1b", "'1f1b'")
    assert type(str(s)) is str and json.dumps({"s": s}) == '{"s": "1f1b"}'
    assert pickle.loads(pickle.dumps(s)) is s
    assert len(_choice_fields()) >= 22  # every choice field of the schema is an enum


def _registries():
    from megaeff.data.builder import DATASETS
    from megaeff.data.tokenizer import TOKENIZERS
    from megaeff.distributed.context_parallel import attention as context_parallel
    from megaeff.distributed.context_parallel import sharding as cp_sharding
    from megaeff.distributed.expert_parallel import experts as expert_parallel
    from megaeff.distributed.fssdp import layout as fssdp_layout
    from megaeff.distributed.pipeline import schedule as pipeline
    from megaeff.kernels.fp8_adamw import PROBES
    from megaeff.layers import linear, lost, sltrain
    from megaeff.optim import galore_projector
    from megaeff.precision.fp8 import FORMATS

    return {
        "method.name": linear.LINEAR_METHODS,
        "method.sltrain_path": sltrain.PATHS,
        "method.lost_act": lost.ACTIVATIONS,
        "method.lost_sparse_init": lost.SPARSE_INITS,
        "optim.first_moment": FORMATS,
        "optim.second_moment": FORMATS,
        "optim.fp8_backend": ("auto", *PROBES),
        "optim.galore_projector": galore_projector.PROJECTORS,
        "optim.galore_side": galore_projector.SIDES,
        "parallel.pp_schedule": pipeline.PIPELINE_SCHEDULES,
        "parallel.cp_impl": context_parallel.IMPLS,
        "parallel.cp_sharding": cp_sharding.SHARDINGS,
        "parallel.fssdp_gather_dtype": fssdp_layout.GATHER_DTYPES,
        "parallel.fssdp_reduce_dtype": fssdp_layout.REDUCE_DTYPES,
        "parallel.expert_impl": ("replicated", *expert_parallel.IMPLS),
        "data.name": DATASETS,
        "data.tokenizer": TOKENIZERS,
    }


def test_choices_match_the_implementation_registries():
    """The schema imports no implementation package; its enums must still offer exactly what the code runs."""
    choices = dict(_choice_fields())
    for key, registry in _registries().items():
        assert set(choices[key].values()) == set(registry), key


@pytest.mark.parametrize("key,enum", _choice_fields(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_choice_fails_at_compose_time_naming_the_field(key, enum, compose_cfg):
    with pytest.raises(ConfigError) as exc:
        compose_cfg([f"{key}=bogus"])
    assert exc.value.field == key and ", ".join(enum.values()) in str(exc.value)
    # Hydra itself (a group file, or a caller that skips the pre-check) refuses it too.
    with pytest.raises((HydraException, OmegaConfBaseException)):
        _hydra_compose([f"{key}=bogus"])


def _hydra_compose(overrides):
    from hydra import compose, initialize_config_dir

    from megaeff.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_saved_config_is_plain(tmp_path, compose_cfg):
    """Checkpoints and W&B get builtin types: torch.load(weights_only=True) refuses Enum objects."""
    import pickle

    import torch
    from omegaconf import OmegaConf

    from megaeff.config import to_config, to_plain, to_yaml
    from megaeff.train import checkpoint as ckpt

    cfg = compose_cfg(["parallel.pp_schedule=interleaved", "method=lost", "optim=coat_adamw"])
    plain = to_plain(cfg)
    leaves = [v for section in plain.values() for v in (section.values() if isinstance(section, dict) else [section])]
    leaves = [w for v in leaves for w in (v.values() if isinstance(v, dict) else [v])]  # optim.sources: {field: str}
    assert plain["optim"]["sources"]["lr"] == "method default"
    assert plain["parallel"]["pp_schedule"] == "interleaved" and plain["method"]["lost_act"] == "silu"
    assert {type(v) for v in leaves} <= {str, int, float, bool, list, type(None)}  # no Choice (a str subclass)
    torch.save(plain, tmp_path / "plain.pt")
    assert torch.load(tmp_path / "plain.pt", weights_only=True) == plain
    torch.save(OmegaConf.to_container(OmegaConf.structured(cfg)), tmp_path / "enums.pt")  # why to_plain exists
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "enums.pt", weights_only=True)

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.save_checkpoint(
        tmp_path / "ckpt",
        1,
        model=model,
        optimizer=opt,
        trainer_state={"step": 1, "config": plain},
        config_yaml=to_yaml(cfg),
        rank=0,
        world_size=1,
        keep_last=1,
    )
    ckpt.verify_checkpoint(path)
    assert torch.load(path / "trainer.pt", weights_only=True)["config"] == plain
    reloaded = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path / "config.yaml"))
    assert to_config(reloaded) == cfg


# ----------------------------------------------------------------------------- validation runs once
def test_trainer_does_not_validate_again(tmp_path, monkeypatch):
    """to_config runs the section checks once; the trainer only adds the tokenizer/vocabulary check."""
    from megaeff.config import parallel as parallel_cfg
    from megaeff.config import schema
    from megaeff.train import trainer as trainer_mod

    calls = {"sections": 0, "world": 0, "vocab": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(schema, "validate_model", counting("sections", schema.validate_model))
    monkeypatch.setattr(parallel_cfg, "resolve_degrees", counting("world", parallel_cfg.resolve_degrees))
    monkeypatch.setattr(trainer_mod, "check_tokenizer_vocab", counting("vocab", trainer_mod.check_tokenizer_vocab))
    from tests.helpers import compose

    cfg = compose(["experiment=smoke", f"run_dir={tmp_path}", "train.plot=false", "train.threads=1"])
    assert calls == {"sections": 1, "world": 0, "vocab": 0}
    trainer_mod.Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), tmp_path).close()
    assert calls == {"sections": 1, "world": 0, "vocab": 1}


# ----------------------------------------------------------------------------- world checks = implementations
@pytest.mark.parametrize("world", [1, 2, 4, 6, 8])
def test_world_checks_agree_with_the_implementations(world):
    """validate_world re-expresses megaeff.distributed's rules; both accept or refuse with the same field."""
    from megaeff.config.parallel import resolve_degrees
    from megaeff.distributed import dims as dims_mod
    from megaeff.distributed.context_parallel.sharding import check_seq_len
    from megaeff.distributed.pipeline.stages import split_layers

    def verdict(fn, *args):
        try:
            fn(*args)
        except ConfigError as exc:
            return exc.field, str(exc)
        return None

    for degrees in (
        {"tp": 2, "cp": 1, "dp": -1, "pp": 1},
        {"tp": 1, "cp": 3, "dp": 1, "pp": -1},
        {"tp": 2, "cp": 2, "dp": 2, "pp": 1},
    ):
        assert verdict(resolve_degrees, degrees, world) == verdict(dims_mod.resolve_degrees, degrees, world)
    for n_layers, virtual, bounds in ((8, 1, []), (6, 2, []), (7, 1, [3]), (8, 2, [2, 4, 6]), (8, 1, [9])):
        cfg = valid_config(
            model=dict(n_layers=n_layers),
            parallel=dict(pp=world, dp=1, pp_virtual=virtual, pp_boundaries=bounds, pp_schedule="interleaved"),
            train=dict(grad_accum=world * 2),
        )
        ours = verdict(validate_config, cfg, world)
        theirs = verdict(split_layers, n_layers, world, virtual, bounds) if world > 1 else None
        assert ours == theirs, (n_layers, virtual, bounds)
    for seq_len, sharding in ((64, "zigzag"), (36, "zigzag"), (60, "contiguous")):
        cfg = valid_config(data=dict(seq_len=seq_len), parallel=dict(cp=world, dp=1, cp_sharding=sharding))
        theirs = verdict(check_seq_len, seq_len, world, sharding) if world > 1 else None
        assert verdict(validate_config, cfg, world) == theirs, (seq_len, sharding)


def test_config_package_imports_no_implementation():
    """megaeff.config stands alone (megaeff.errors aside): the implementations import it, never the reverse."""
    import subprocess
    import sys

    code = "import sys, megaeff.config; print(sorted(m for m in sys.modules if m.startswith('megaeff')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {m for m in eval(out) if not m.startswith("megaeff.config")} == {"megaeff", "megaeff.errors"}
