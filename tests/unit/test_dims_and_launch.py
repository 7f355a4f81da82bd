"""Parallel degrees and rank coordinates, launcher environment parsing, communication counters."""

from __future__ import annotations

import pytest
import torch

from megaeff.config.schema import ParallelConfig
from megaeff.distributed.comm import CommStats, all_reduce_, all_reduce_scalar
from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.launch import LaunchEnv, export_slurm_env, read_launch_env, strip_launcher_args
from megaeff.errors import ConfigError


# ----------------------------------------------------------------------------- ParallelDims
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_from_config_infers_dp(world):
    dims = ParallelDims.from_config(ParallelConfig(tp=1, cp=1, dp=-1, pp=1), world)
    assert (dims.tp, dims.cp, dims.dp, dims.pp, dims.world_size) == (1, 1, world, 1, world)
    assert dims.device == torch.device("cpu")


def test_from_config_explicit_degrees_and_rank():
    dims = ParallelDims.from_config(ParallelConfig(tp=1, cp=1, dp=4, pp=1), 4, rank=3)
    assert dims.dp == 4 and dims.rank == 3 and not dims.is_main
    assert ParallelDims.from_config(ParallelConfig(), 4, rank=0).is_main


def test_from_config_gates_axes():
    """Training configs may use every axis; a build may still gate some (`implemented`), naming the field."""
    dims = ParallelDims.from_config(ParallelConfig(tp=2, cp=2, dp=-1, pp=2), 16)
    assert (dims.tp, dims.cp, dims.dp, dims.pp) == (2, 2, 2, 2)
    with pytest.raises(ConfigError) as exc:
        ParallelDims.from_config(ParallelConfig(cp=2, dp=-1), 4, implemented=("tp", "dp", "pp"))
    assert exc.value.field == "parallel.cp"


def test_from_config_errors():
    with pytest.raises(ConfigError) as exc:
        ParallelDims.from_config(ParallelConfig(tp=1, cp=1, dp=3, pp=1), 4)
    assert exc.value.field == "parallel"
    with pytest.raises(ConfigError) as exc:
        ParallelDims.from_config(ParallelConfig(tp=1, cp=1, dp=0, pp=1), 4)
    assert exc.value.field == "parallel.dp"
    with pytest.raises(ConfigError) as exc:
        ParallelDims.from_config(ParallelConfig(tp=1, cp=-1, dp=-1, pp=1), 4)
    assert exc.value.field == "parallel.dp"


def test_pure_dp_rank_is_dp_rank():
    for r in range(4):
        d = ParallelDims(tp=1, cp=1, dp=4, pp=1, world_size=4, rank=r)
        assert (d.tp_rank, d.cp_rank, d.dp_rank, d.pp_rank) == (0, 0, r, 0)


def test_rank_coordinates_tp_innermost():
    seen = set()
    for r in range(8):
        d = ParallelDims(tp=2, cp=1, dp=2, pp=2, world_size=8, rank=r)
        coords = (d.tp_rank, d.cp_rank, d.dp_rank, d.pp_rank)
        assert coords == (r % 2, 0, (r // 2) % 2, r // 4)
        assert d._coord("tp") == d.tp_rank and d._coord("pp") == d.pp_rank
        # rank = tp_rank + tp*(cp_rank + cp*(dp_rank + dp*pp_rank))
        assert r == d.tp_rank + 2 * (d.cp_rank + 1 * (d.dp_rank + 2 * d.pp_rank))
        seen.add(coords)
    assert len(seen) == 8
    with pytest.raises(KeyError):
        ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1)._coord("ep")


def test_rank_coordinates_all_axes():
    tp, cp, dp, pp = 2, 3, 2, 2
    world = tp * cp * dp * pp
    coords = set()
    for r in range(world):
        d = ParallelDims(tp=tp, cp=cp, dp=dp, pp=pp, world_size=world, rank=r)
        assert r == d.tp_rank + tp * (d.cp_rank + cp * (d.dp_rank + dp * d.pp_rank))
        coords.add((d.tp_rank, d.cp_rank, d.dp_rank, d.pp_rank))
    assert len(coords) == world


def test_axis_seed():
    d0 = ParallelDims(tp=2, cp=1, dp=2, pp=1, world_size=4, rank=0)
    d1 = ParallelDims(tp=2, cp=1, dp=2, pp=1, world_size=4, rank=1)  # tp_rank 1, dp_rank 0
    d2 = ParallelDims(tp=2, cp=1, dp=2, pp=1, world_size=4, rank=2)  # tp_rank 0, dp_rank 1
    assert d0.axis_seed(5, "dp") == d1.axis_seed(5, "dp") == 5
    assert d2.axis_seed(5, "dp") != d0.axis_seed(5, "dp")
    assert d1.axis_seed(5, "tp") != d0.axis_seed(5, "tp")


def test_group_ranks_and_seeds():
    d = ParallelDims(tp=2, cp=2, dp=2, pp=1, world_size=8, rank=5)  # tp 1, cp 0, dp 1
    assert d.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.group_ranks("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert d.group_ranks("tp_cp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert (d.size("dp_cp"), d.rank_in("dp_cp"), d.rank_in("tp"), d.size("world")) == (4, 2, 1, 8)
    assert d.is_first_stage and d.is_last_stage
    with pytest.raises(KeyError):
        d.group_ranks("ep")
    seeds = [ParallelDims(tp=2, cp=2, dp=2, pp=1, world_size=8, rank=r) for r in range(8)]
    tp_seeds = [x.seed_for(7, ("tp",)) for x in seeds]
    assert tp_seeds[0] != tp_seeds[1] and tp_seeds[0] == tp_seeds[2] == tp_seeds[4]  # equal over cp and dp
    assert len({x.seed_for(7, ("tp", "cp")) for x in seeds}) == 4
    assert {x.seed_for(7) for x in seeds} == {7}


def test_inconsistent_degrees_rejected():
    with pytest.raises(ConfigError):
        ParallelDims(tp=2, cp=1, dp=1, pp=1, world_size=4)
    with pytest.raises(ValueError, match="rank 4"):
        ParallelDims(tp=2, cp=1, dp=2, pp=1, world_size=4, rank=4)


def test_single_process_groups():
    d = ParallelDims.from_config(ParallelConfig(), 1)
    d.build_groups()  # no process group needed for one rank
    assert d.group("dp") is None and d.group("world") is None


# ----------------------------------------------------------------------------- launcher args and env
@pytest.mark.parametrize(
    "argv,expected_args,expected_rank",
    [
        (["--local_rank=3", "a=1", "b=2"], ["a=1", "b=2"], 3),
        (["a=1", "--local_rank", "3", "b=2"], ["a=1", "b=2"], 3),
        (["a=1", "--local-rank=3", "b=2"], ["a=1", "b=2"], 3),
        (["a=1", "--local-rank", "5"], ["a=1"], 5),
        (["x=1", "y=2", "+z=3"], ["x=1", "y=2", "+z=3"], None),
        ([], [], None),
    ],
)
def test_strip_launcher_args(argv, expected_args, expected_rank):
    original = list(argv)
    out, local_rank = strip_launcher_args(argv)
    assert out == expected_args
    assert local_rank == expected_rank
    assert argv == original  # input untouched


def test_read_launch_env_torchrun():
    env = read_launch_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert env == LaunchEnv(rank=5, world_size=8, local_rank=1, launcher="torchrun")
    assert env.is_distributed
    assert read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}).local_rank == 0


def test_read_launch_env_slurm():
    # What srun gives task 3 of a 4-task step (step 0) inside an 8-task allocation: the step's count is the world.
    srun_task = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                 "SLURM_STEP_NUM_TASKS": "4"}  # fmt: skip
    env = read_launch_env(srun_task)
    assert env == LaunchEnv(rank=3, world_size=4, local_rank=1, launcher="slurm", step="0")
    assert env.describe() == "launched by srun step 0: 4 ranks"
    # A one-task step is a single-process run.
    assert read_launch_env({**srun_task, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}).launcher == "single"


def test_read_launch_env_batch_script_of_multi_task_job_is_one_process():
    """`sbatch --ntasks=2 --wrap 'megaeff-train ...'`: the batch step has SLURM_PROCID=0 and SLURM_NTASKS=2 but is
    not an srun step (no SLURM_STEP_ID / SLURM_STEP_NUM_TASKS), so it must not wait for a second rank."""
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"}
    assert read_launch_env(batch) == LaunchEnv(0, 1, 0, "single")
    assert read_launch_env({**batch, "MASTER_ADDR": "node1"}).launcher == "single"


def test_read_launch_env_none():
    env = read_launch_env({})
    assert env == LaunchEnv(0, 1, 0, "single")
    assert not env.is_distributed


def test_read_launch_env_bad_value():
    with pytest.raises(ValueError, match="RANK"):
        read_launch_env({"RANK": "zero", "WORLD_SIZE": "2"})


def test_export_slurm_env():
    launch = LaunchEnv(2, 4, 0, "slurm")
    env = {"MASTER_ADDR": "node1"}
    export_slurm_env(launch, env)
    assert env == {"MASTER_ADDR": "node1", "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        export_slurm_env(launch, {})
    untouched = {}
    export_slurm_env(LaunchEnv(0, 1, 0, "single"), untouched)
    assert untouched == {}


# ----------------------------------------------------------------------------- CommStats
def test_comm_stats_record_and_reset():
    s = CommStats()
    assert s.total() == 0 and s.snapshot() == {}
    s.record("dp", "all_reduce", 100)
    s.record("dp", "all_reduce", 28)
    s.record("world", "all_reduce", 8)
    assert s.snapshot() == {"dp/all_reduce": 128, "world/all_reduce": 8}
    assert s.total() == 136
    snap = s.snapshot()
    s.reset()
    assert s.total() == 0 and s.snapshot() == {}
    assert snap["dp/all_reduce"] == 128  # snapshot is a copy


def test_collectives_are_noops_without_group():
    s = CommStats()
    t = torch.ones(4)
    assert all_reduce_(t, None, "dp", s) is t
    assert all_reduce_scalar(2.5, None, "dp", s, torch.device("cpu")) == 2.5
    assert s.total() == 0
