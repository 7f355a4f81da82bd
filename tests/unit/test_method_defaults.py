"""Per-method optimizer defaults (conf/method_optim/) and where each optimizer value came from (issue 20, part 1).

Precedence: command line > experiment preset > method default > optimizer file. The values are Hydra's; the
sources are replayed by megaeff/config/provenance.py, and both must agree. The CLI's path (one process, torchrun,
the deepspeed launcher) is checked in tests/integration/test_cli.py and tests/distributed/test_launchers.py."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from megaeff.config.provenance import (
    EXPERIMENT,
    METHOD,
    OPTIM,
    USER,
    describe_sources,
    optim_fields,
    sources_record,
    write_sources,
)
from megaeff.errors import ConfigError
from tests.helpers import CONF, compose

METHODS_WITH_DEFAULTS = sorted(p.stem for p in (CONF / "method_optim").glob("*.yaml"))


def file_values(path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


ADAMW = file_values(CONF / "optim" / "adamw.yaml")


def test_every_generic_method_brings_its_own_learning_rate():
    assert {"sltrain", "lost"} <= set(METHODS_WITH_DEFAULTS)
    # A no-op mechanism would leave adamw.yaml's value; at least one default must differ from it to be tested.
    assert any(file_values(CONF / "method_optim" / f"{m}.yaml")["lr"] != ADAMW["lr"] for m in METHODS_WITH_DEFAULTS)


@pytest.mark.parametrize("method", METHODS_WITH_DEFAULTS)
def test_method_defaults_are_applied_and_attributed(method):
    own = file_values(CONF / "method_optim" / f"{method}.yaml")
    o = compose([f"method={method}"]).optim
    for name in optim_fields():
        if name in own:
            assert getattr(o, name) == own[name], name
            assert o.sources[name] == METHOD, name
        else:
            assert o.sources[name] == OPTIM, name
            if name in ADAMW:
                assert getattr(o, name) == ADAMW[name], name


def test_dense_keeps_the_optimizer_file_values():
    o = compose([]).optim
    assert o.lr == ADAMW["lr"] and set(o.sources.values()) == {OPTIM}


def test_the_user_wins_over_the_method_default():
    own = file_values(CONF / "method_optim" / "sltrain.yaml")
    o = compose(["method=sltrain", "optim.lr=1.234e-4", "++optim.weight_decay=0.05"]).optim
    assert (o.lr, o.sources["lr"]) == (1.234e-4, USER)
    assert (o.weight_decay, o.sources["weight_decay"]) == (0.05, USER)
    # what the user did not set still comes from the method
    for name in set(own) - {"lr", "weight_decay"}:
        assert (getattr(o, name), o.sources[name]) == (own[name], METHOD)


def test_an_experiment_wins_over_the_method_default_and_the_user_over_both():
    """shakespeare_9m sets optim.lr and optim.warmup_steps (and keeps whatever method is chosen)."""
    preset = file_values(CONF / "experiment" / "shakespeare_9m.yaml")["optim"]
    own = file_values(CONF / "method_optim" / "lost.yaml")
    assert own["lr"] != preset["lr"]  # else the precedence would be invisible
    o = compose(["method=lost", "experiment=shakespeare_9m"]).optim
    assert (o.lr, o.sources["lr"]) == (preset["lr"], EXPERIMENT)
    assert (o.warmup_steps, o.sources["warmup_steps"]) == (preset["warmup_steps"], EXPERIMENT)
    for name in set(own) - set(preset):
        assert (getattr(o, name), o.sources[name]) == (own[name], METHOD)
    o = compose(["method=lost", "experiment=shakespeare_9m", "optim.lr=7e-4"]).optim
    assert (o.lr, o.sources["lr"]) == (7e-4, USER)


def test_an_experiment_that_switches_the_method_is_followed():
    """lost_60m overrides the method to lost_60m (no method default of its own): its recipe, not lost's."""
    o = compose(["experiment=lost_60m"]).optim
    preset = file_values(CONF / "experiment" / "lost_60m.yaml")["optim"]
    for name in optim_fields():
        assert o.sources[name] == (EXPERIMENT if name in preset else OPTIM), name
    assert o.lr == preset["lr"]


def test_method_defaults_beat_any_optimizer_file():
    own = file_values(CONF / "method_optim" / "sltrain.yaml")
    o = compose(["method=sltrain", "optim=coat_adamw"]).optim
    assert (o.lr, o.sources["lr"]) == (own["lr"], METHOD)


def test_the_run_log_line_and_json_name_each_source(tmp_path):
    o = compose(["method=sltrain", "optim.weight_decay=0.1"]).optim
    (line,) = describe_sources(o)
    assert f"method default: lr={o.lr}" in line
    assert "user (command line): weight_decay=0.1" in line
    assert "optim default (conf/optim/adamw.yaml): betas=[0.9, 0.95]" in line
    path = write_sources(o, tmp_path)
    record = json.loads(path.read_text())
    assert record == json.loads(json.dumps(sources_record(o)))
    assert record["lr"] == {"value": o.lr, "source": METHOD}
    assert record["name"] == {"value": "adamw", "source": OPTIM}


def test_a_config_built_in_python_reports_nothing(tmp_path):
    from megaeff.config.schema import Config

    assert describe_sources(Config().optim) == [] and write_sources(Config().optim, tmp_path) is None


def test_a_hand_written_source_is_refused():
    from megaeff.config.schema import to_config
    from tests.helpers import compose_raw

    composed = compose_raw([])
    for key, value in (("optim.sources.lr", "guess"), ("optim.sources.nope", "user")):
        cfg = composed.copy()
        OmegaConf.update(cfg, key, value, force_add=True)
        with pytest.raises(ConfigError, match=rf"optim\.sources\.{key.rsplit('.', 1)[1]}"):
            to_config(cfg)


def test_the_sweep_tunes_under_the_shipped_recipes():
    """tools/bench/lr_sweep.py runs each method with the clipping / weight decay its method default ships."""
    from tools.bench.lr_sweep import RECIPES

    for method in METHODS_WITH_DEFAULTS:
        own = {k: v for k, v in file_values(CONF / "method_optim" / f"{method}.yaml").items() if k != "lr"}
        swept = {k.split(".", 1)[1]: float(v) for k, v in (o.split("=") for o in RECIPES[method])}
        assert swept == own, method
