"""metrics.jsonl writing/trimming, reading it back for plots, and the plot CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from megaeff.cli.plot_runs import main as plot_main
from megaeff.cli.plot_runs import plot_runs, read_run
from megaeff.train.metrics import METRICS_FILE, MetricsLogger, format_duration, format_rate, trim_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sample_records():
    return [
        {"kind": "train", "step": 2, "loss": 5.0, "lr": 1e-3},
        {"kind": "train", "step": 1, "loss": 5.5, "lr": 1e-3},
        {"kind": "eval", "step": 2, "val_loss": 4.8, "val_ppl": math.exp(4.8), "val_tokens": 100},
        {"kind": "train", "step": 3, "loss": 4.5},
        {"kind": "train", "step": 2, "loss": 4.9},  # a resumed run re-logged step 2: the later record wins
        {"kind": "eval", "step": 4, "val_loss": 4.0, "val_ppl": math.exp(4.0), "val_tokens": 100},
        {"kind": "train", "step": 4},  # no loss: ignored
    ]


# ----------------------------------------------------------------------------- read_run
def test_read_run_sorted_and_later_duplicate_wins(tmp_path):
    path = write_metrics(tmp_path / "run" / METRICS_FILE, sample_records())
    path.write_text(path.read_text() + "\n")  # blank lines are skipped
    for arg in (path, path.parent):  # a file or its run directory
        run = read_run(arg)
        assert run["train_loss"] == [(1, 5.5), (2, 4.9), (3, 4.5)]
        assert run["val_loss"] == [(2, 4.8), (4, 4.0)]
        assert [s for s, _ in run["val_ppl"]] == [2, 4]
        assert run["val_ppl"][1][1] == pytest.approx(math.exp(4.0))


def test_read_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "missing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "train", "step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match=":2:"):
        read_run(bad)


# ----------------------------------------------------------------------------- plot_runs
def test_plot_runs_writes_png(tmp_path):
    import matplotlib.image as mpimg

    a = write_metrics(tmp_path / "a" / METRICS_FILE, sample_records())
    b = write_metrics(
        tmp_path / "b" / METRICS_FILE, [{"kind": "train", "step": s, "loss": 6.0 - s} for s in range(1, 5)]
    )
    out = plot_runs([a.parent, b], tmp_path / "plots" / "cmp.png", ["first", "second"])
    assert out == tmp_path / "plots" / "cmp.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plot_main(tmp_path, capsys):
    run = write_metrics(tmp_path / "r" / METRICS_FILE, sample_records()).parent
    out = tmp_path / "o.png"
    assert plot_main([str(run), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out


def test_plot_main_missing_file(tmp_path, capsys):
    rc = plot_main([str(tmp_path / "nope" / METRICS_FILE), "-o", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error" in err and "nope" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_main_label_count_mismatch(tmp_path):
    run = write_metrics(tmp_path / "r" / METRICS_FILE, sample_records()).parent
    with pytest.raises(SystemExit) as exc:
        plot_main([str(run), "--labels", "a", "b"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- MetricsLogger
def _lcfg():
    return SimpleNamespace(backend="jsonl", progress=True)


def _train_metrics(loss):
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 12345.0,
        "mfu": 0.01,
        "step_time_s": 0.1,
    }


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_logger_writes_jsonl_and_trims_on_resume(tmp_path, capsys):
    log = MetricsLogger(tmp_path, _lcfg(), enabled=True, total_steps=10, start_step=0, run_name="t", config={})
    for step in range(1, 7):
        log.log_train(step, _train_metrics(5.0 - 0.1 * step))
        if step % 3 == 0:
            log.log_eval(step, {"val_loss": 4.0, "val_ppl": math.exp(4.0), "val_tokens": 1000})
    log.info("hello")
    log.close()
    out = capsys.readouterr().out
    assert "step  6/10" in out and "12.3k tok/s" in out and "eval  step 3" in out and "hello" in out

    path = tmp_path / METRICS_FILE
    recs = _read(path)
    assert [(r["kind"], r["step"]) for r in recs] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("eval", 3),
        ("train", 4),
        ("train", 5),
        ("train", 6),
        ("eval", 6),
    ]
    assert recs[0]["loss"] == pytest.approx(4.9) and recs[3]["val_tokens"] == 1000

    # Resume from step 4: records after step 4 are dropped, new ones append.
    log = MetricsLogger(tmp_path, _lcfg(), enabled=True, total_steps=10, start_step=4, run_name="t", config={})
    assert [(r["kind"], r["step"]) for r in _read(path)] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("eval", 3),
        ("train", 4),
    ]
    log.log_train(5, _train_metrics(1.0))
    log.close()
    recs = _read(path)
    assert recs[-1]["step"] == 5 and recs[-1]["loss"] == 1.0
    assert read_run(path)["train_loss"][-1] == (5, 1.0)


def test_metrics_logger_disabled_writes_nothing(tmp_path, capsys):
    log = MetricsLogger(tmp_path, _lcfg(), enabled=False, total_steps=10, start_step=0, run_name="t", config={})
    log.log_train(1, _train_metrics(1.0))
    log.log_eval(1, {"val_loss": 1.0, "val_ppl": 2.7, "val_tokens": 1})
    log.info("x")
    log.close()
    assert not (tmp_path / METRICS_FILE).exists()
    assert capsys.readouterr().out == ""


def test_metrics_logger_progress_off(tmp_path, capsys):
    lcfg = SimpleNamespace(backend="jsonl", progress=False)
    log = MetricsLogger(tmp_path, lcfg, enabled=True, total_steps=10, start_step=0, run_name="t", config={})
    log.log_train(1, _train_metrics(1.0))
    log.close()
    assert "step" not in capsys.readouterr().out
    assert len(_read(tmp_path / METRICS_FILE)) == 1


def test_trim_jsonl_drops_truncated_lines(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tra')
    trim_jsonl(path, 5)
    assert _read(path) == [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}]
    trim_jsonl(tmp_path / "missing.jsonl", 0)  # no file: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


# ----------------------------------------------------------------------------- formatting
@pytest.mark.parametrize(
    "seconds,text",
    [
        (0, "0s"),
        (59.4, "59s"),
        (59.6, "1m00s"),
        (61, "1m01s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3 * 3600 + 125, "3h02m"),
        (float("nan"), "?"),
        (float("inf"), "?"),
        (-1, "?"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_rate():
    assert format_rate(999) == "999"
    assert format_rate(12_345) == "12.3k"
    assert format_rate(2_500_000) == "2.50M"
