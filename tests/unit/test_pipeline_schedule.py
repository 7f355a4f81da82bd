"""Pipeline schedules: Megatron's orders, deadlock-freedom under the executor's dependencies, bubble closed forms
recovered exactly from the simulation, activation memory (peak in-flight), argument errors, and the CLI."""

import importlib.util
import json
from pathlib import Path

import pytest

from megaeff.distributed.pipeline.schedule import (
    Action,
    PipelineDeadlockError,
    bubble_fraction,
    build_schedule,
    closed_form_bubble,
    format_timeline,
    peak_in_flight,
    simulate,
    validate_schedule,
    warmup_forwards,
)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "pipeline_schedule.py"


def labels(actions, virtual=1):
    return " ".join(a.label(virtual) for a in actions)


def sweep():
    """(name, pp, m, v) over pp 1..8, m 1..16, and v 1..3 for interleaved where m % pp == 0."""
    for pp in range(1, 9):
        for m in range(1, 17):
            yield "gpipe", pp, m, 1
            yield "1f1b", pp, m, 1
            if m % pp == 0:
                for v in (1, 2, 3):
                    yield "interleaved", pp, m, v


def test_1f1b_pp4_m8_matches_megatron():
    # Megatron forward_backward_pipelining_without_interleaving: rank r warms up with pp - r - 1 forwards, each
    # steady iteration is one forward then one backward, the cool-down drains the remaining backwards.
    ranks = build_schedule("1f1b", 4, 8)
    assert labels(ranks[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"
    assert labels(ranks[1]) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7"
    assert labels(ranks[2]) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7"
    assert labels(ranks[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"
    assert all(a.chunk == 0 for rank in ranks for a in rank)


def test_1f1b_fewer_microbatches_than_stages_is_all_warmup_on_early_ranks():
    ranks = build_schedule("1f1b", 4, 2)
    assert labels(ranks[0]) == "F0 F1 B0 B1"
    assert labels(ranks[2]) == "F0 F1 B0 B1"
    assert labels(ranks[3]) == "F0 B0 F1 B1"


def test_gpipe_order():
    for rank in build_schedule("gpipe", 3, 4):
        assert labels(rank) == "F0 F1 F2 F3 B0 B1 B2 B3"


def test_interleaved_pp2_m4_v2_matches_megatron():
    # Megatron's schedule table with group size pp=2: (mb, chunk) = 00 10 01 11 20 30 21 31; backward walks it with
    # the chunk mirrored. Warm-up = 2*(pp - r - 1) + (v - 1)*pp: 4 on rank 0, 2 on rank 1.
    ranks = build_schedule("interleaved", 2, 4, 2)
    assert labels(ranks[0], 2) == ("F0c0 F1c0 F0c1 F1c1 F2c0 B0c1 F3c0 B1c1 F2c1 B0c0 F3c1 B1c0 B2c1 B3c1 B2c0 B3c0")
    assert labels(ranks[1], 2) == ("F0c0 F1c0 F0c1 B0c1 F1c1 B1c1 F2c0 B0c0 F3c0 B1c0 F2c1 B2c1 F3c1 B3c1 B2c0 B3c0")


def test_interleaved_all_warmup_on_rank0_when_m_equals_pp():
    ranks = build_schedule("interleaved", 4, 4, 2)
    assert [a.kind for a in ranks[0]] == ["F"] * 8 + ["B"] * 8
    assert labels(ranks[3][:6], 2) == "F0c0 F1c0 F2c0 F3c0 F0c1 B0c1"


def test_warmup_counts():
    assert [warmup_forwards("1f1b", 4, 8, r) for r in range(4)] == [3, 2, 1, 0]
    assert [warmup_forwards("1f1b", 4, 2, r) for r in range(4)] == [2, 2, 1, 0]
    assert [warmup_forwards("gpipe", 4, 8, r) for r in range(4)] == [8] * 4
    assert [warmup_forwards("interleaved", 4, 8, r, 2) for r in range(4)] == [10, 8, 6, 4]
    assert [warmup_forwards("interleaved", 4, 4, r, 3) for r in range(4)] == [12, 12, 10, 8]
    assert [warmup_forwards("interleaved", 4, 8, r, 1) for r in range(4)] == [3, 2, 1, 0]


@pytest.mark.parametrize("pp,m", [(1, 1), (1, 5), (2, 4), (3, 9), (4, 8), (8, 16)])
def test_interleaved_with_one_chunk_is_1f1b(pp, m):
    assert build_schedule("interleaved", pp, m, 1) == build_schedule("1f1b", pp, m)


def test_every_schedule_complete_deadlock_free_and_bubble_exact():
    for name, pp, m, v in sweep():
        schedule = build_schedule(name, pp, m, v)
        assert len(schedule) == pp
        assert validate_schedule(schedule, pp, v) == m
        for rank in schedule:
            assert sorted((a.kind, a.microbatch, a.chunk) for a in rank) == sorted(
                (k, mb, c) for k in "FB" for mb in range(m) for c in range(v)
            ), (name, pp, m, v)
        expected = closed_form_bubble(name, pp, m, v)
        assert bubble_fraction(schedule, pp, v) == pytest.approx(expected, rel=1e-12, abs=1e-12), (name, pp, m, v)


@pytest.mark.parametrize("t_b", [1.0, 1.5, 3.0])
def test_bubble_closed_form_holds_for_other_backward_costs(t_b):
    for name, pp, m, v in [("gpipe", 4, 6, 1), ("1f1b", 5, 7, 1), ("interleaved", 4, 8, 2), ("interleaved", 3, 6, 3)]:
        schedule = build_schedule(name, pp, m, v)
        assert bubble_fraction(schedule, pp, v, 1.0, t_b) == pytest.approx(
            closed_form_bubble(name, pp, m, v), rel=1e-12
        )


def test_closed_forms():
    assert closed_form_bubble("gpipe", 4, 8) == pytest.approx(3 / 8)
    assert closed_form_bubble("1f1b", 4, 8) == pytest.approx(3 / 8)
    assert closed_form_bubble("interleaved", 4, 8, 2) == pytest.approx(3 / 16)
    assert closed_form_bubble("1f1b", 1, 3) == 0.0


def test_simulated_times_1f1b_pp2_m2():
    sim = simulate(build_schedule("1f1b", 2, 2), 2, 1, t_f=1.0, t_b=2.0)
    # rank 0: F0 F1 B0 B1; rank 1: F0 B0 F1 B1
    assert sim.starts == [[0, 1, 4, 7], [1, 2, 4, 5]]
    assert sim.ends == [[1, 2, 6, 9], [2, 4, 5, 7]]
    assert sim.makespan == 9
    assert sim.busy == [6, 6] and sim.idle == [3, 3]


def test_interleaved_chunk_actions_take_a_fraction_of_the_rank_time():
    sim = simulate(build_schedule("interleaved", 2, 2, 2), 2, 2, t_f=1.0, t_b=2.0)
    assert sim.ends[0][0] - sim.starts[0][0] == pytest.approx(0.5)
    assert sim.busy == [pytest.approx(3.0 * 2)] * 2


def test_simulate_detects_deadlock():
    schedule = build_schedule("1f1b", 2, 2)
    schedule[0] = [schedule[0][2]] + schedule[0][:2] + schedule[0][3:]  # B0 before F0 on rank 0
    with pytest.raises(PipelineDeadlockError, match="rank 0: B0"):
        simulate(schedule, 2)
    # A cycle across ranks: the last rank insists on microbatch 1 first, but rank 0 only forwards it after B0,
    # which the last rank produces after microbatch 1.
    schedule = build_schedule("1f1b", 2, 2)
    schedule[1] = [Action("F", 1, 0), Action("B", 1, 0), Action("F", 0, 0), Action("B", 0, 0)]
    schedule[0] = [Action("F", 0, 0), Action("B", 0, 0), Action("F", 1, 0), Action("B", 1, 0)]
    with pytest.raises(PipelineDeadlockError):
        simulate(schedule, 2)


def test_validate_schedule_rejects_incomplete_or_duplicated():
    schedule = build_schedule("gpipe", 2, 2)
    with pytest.raises(ValueError, match="rank 1"):
        validate_schedule([schedule[0], schedule[1][:-1]], 2)
    with pytest.raises(ValueError, match="rank 0"):
        validate_schedule([schedule[0] + [schedule[0][0]], schedule[1]], 2)
    with pytest.raises(ValueError, match="expected pp=3"):
        validate_schedule(schedule, 3)
    with pytest.raises(ValueError, match="chunks"):
        validate_schedule(schedule, 2, virtual=2)


def test_peak_in_flight():
    for pp in range(1, 9):
        for m in range(1, 17):
            ones = build_schedule("1f1b", pp, m)
            assert peak_in_flight(ones[0]) == min(pp, m)
            assert [peak_in_flight(rank) for rank in ones] == [min(pp - r, m) for r in range(pp)]
            assert all(peak_in_flight(rank) == m for rank in build_schedule("gpipe", pp, m))
    # Interleaved counts (microbatch, chunk) pairs: rank 0 of pp=4 v=2 m=8 holds its 10 warm-up chunks plus one.
    ranks = build_schedule("interleaved", 4, 8, 2)
    assert [peak_in_flight(rank) for rank in ranks] == [11, 9, 7, 5]


@pytest.mark.parametrize(
    "args,match",
    [
        (("zb", 2, 4), "unknown schedule name 'zb'; available: gpipe, 1f1b, interleaved"),
        (("1f1b", 0, 4), "pp must be"),
        (("1f1b", 2, 0), "microbatches must be"),
        (("interleaved", 2, 4, 0), "virtual must be"),
        (("1f1b", 2, 4, 2), "virtual=2 needs the 'interleaved' schedule"),
        (("gpipe", 2, 4, 3), "virtual=3 needs the 'interleaved' schedule"),
        (("interleaved", 4, 6, 2), "microbatches divisible by pp, got microbatches=6, pp=4"),
        (("1f1b", 2.0, 4), "pp must be"),
    ],
)
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(*args)


def test_format_timeline_aligns_to_time_slots():
    text = format_timeline(build_schedule("gpipe", 2, 2), 2)
    assert text.splitlines() == [
        "        0  1  2  3  4  5  6  7  8  9",
        "rank 0 |F0 F1 .  .  .  B0    B1",
        "rank 1 |.  F0 F1 B0    B1    .  .",
    ]
    wide = format_timeline(build_schedule("1f1b", 8, 16), 8, max_cells=20)
    assert wide.startswith("(order only")
    assert "rank 7 |F0 B0 F1 B1" in wide


def test_format_timeline_interleaved_labels_chunks():
    text = format_timeline(build_schedule("interleaved", 2, 4, 2), 2, 2)
    row0 = text.splitlines()[1]
    assert row0.startswith("rank 0 |F0c0 F1c0 F0c1 F1c1 F2c0 .    B0c1      F3c0")


def _load_tool():
    spec = importlib.util.spec_from_file_location("pipeline_schedule_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_and_writes_png_and_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "s.png", tmp_path / "s.json"
    tool = _load_tool()
    argv = [
        "--schedule",
        "interleaved",
        "--pp",
        "4",
        "--microbatches",
        "8",
        "--virtual",
        "2",
        "--png",
        str(png),
        "--json",
        str(out),
    ]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "simulated 0.187500, closed form 0.187500" in printed
    assert "rank 0: warm-up forwards 10, peak in-flight 11" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    assert report["bubble_fraction"] == pytest.approx(report["bubble_closed_form"], rel=1e-12)
    assert [r["peak_in_flight"] for r in report["ranks"]] == [11, 9, 7, 5]
    assert len(report["ranks"][0]["actions"]) == 2 * 8 * 2
    first = report["ranks"][1]["actions"][0]
    assert first == {"kind": "F", "microbatch": 0, "chunk": 0, "start": 0.5, "end": 1.0}


def test_cli_rejects_bad_arguments(capsys):
    tool = _load_tool()
    with pytest.raises(SystemExit) as exc:
        tool.main(["--schedule", "interleaved", "--pp", "4", "--microbatches", "6", "--virtual", "2"])
    assert exc.value.code == 2
    assert "microbatches divisible by pp" in capsys.readouterr().err
