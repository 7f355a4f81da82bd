"""The candidate layouts of a plan, pruned by stated rules and checked by megaeff's own config validation.

A `Layout` is every choice the planner makes: the degrees (tp, cp, dp, pp), the pipeline schedule and virtual
stages, the context-parallel scheme, data parallelism by bucketed all-reduce or FSSDP (with its gather dtype),
sequence parallelism, activation checkpointing, optimizer in backward, the micro-batch size and hence the
micro-batches per step (global batch / (dp x micro-batch)). The placement of the axes on the node boundary is
megaeff's fixed rank order (tp innermost, cp, dp, pp outermost: megaeff/distributed/dims.py), so it is not a
choice; cluster.py derives from it which axis crosses a node.

Pruning rules (each pruned layout is reported with its rule):
- tp divides the GPUs of a node (tensor parallelism stays on NVLink) and the model's heads, kv heads, widths and
  vocabulary (validation says which);
- cp > 1 only if each context shard keeps at least `min_cp_tokens` tokens (short shards: ring steps too small);
- pp divides the layers (pp x virtual stages, an even split), interleaved with 2 chunks per rank;
  GPipe is not enumerated (the same bubble as 1F1B under the simulator, with all micro-batches in flight);
- sequence parallelism is on whenever tp > 1 (the same bytes as tp's all-reduces, less activation memory);
- the global batch divides into dp x micro-batch x micro-batches.
Every remaining candidate is validated exactly as megaeff-train would validate it (`validate_sections` and
`validate_world` on the composed config); a refusal is reported with megaeff's own message.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megaeff.config.choices import CpImpl, CpSharding, DpImpl, FssdpGatherDtype, ParamDtype, PpSchedule, Precision
from megaeff.config.optim import PrecisionConfig
from megaeff.config.parallel import validate_world
from megaeff.config.schema import Config, validate_sections
from megaeff.errors import MegaeffError


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    pp: int
    micro_batch: int
    grad_accum: int  # micro-batches per step
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    cp_impl: str = "ring"
    cp_sharding: str = "zigzag"
    dp_impl: str = "allreduce"
    gather_dtype: str = "fp32"  # FSSDP only
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    in_backward: bool = False
    precision: str = ""  # a PRECISIONS preset; "": the base config's precision

    @property
    def degrees(self) -> Dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}

    def name(self) -> str:
        """A short file-name-safe name, e.g. tp2_sp_pp4i2_dp8fssdp_bf16_mb1_ac."""
        parts = []
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("_sp" if self.sequence_parallel else ""))
        if self.cp > 1:
            parts.append(f"cp{self.cp}{self.cp_impl}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}" + (f"i{self.pp_virtual}" if self.pp_schedule == "interleaved" else ""))
        dp = f"dp{self.dp}" + (f"fssdp_{self.gather_dtype}" if self.dp_impl == "fssdp" else "")
        parts += [dp, f"mb{self.micro_batch}x{self.grad_accum}"]
        parts += ["ac"] * self.activation_checkpointing + ["inbw"] * self.in_backward
        parts += [self.precision] * bool(self.precision)
        return "_".join(parts)

    def parallel_fields(self) -> Dict[str, object]:
        """The `parallel` section of this layout (what conf/parallel/<name>.yaml holds)."""
        out: Dict[str, object] = dict(self.degrees)
        if self.tp > 1:
            out["sequence_parallel"] = self.sequence_parallel
        if self.pp > 1:
            out.update(pp_schedule=self.pp_schedule, pp_virtual=self.pp_virtual)
        if self.cp > 1:
            out.update(cp_impl=self.cp_impl, cp_sharding=self.cp_sharding)
        out["dp_impl"] = self.dp_impl
        if self.dp_impl == "fssdp":
            out["fssdp_gather_dtype"] = self.gather_dtype
        return out

    def overrides(self) -> List[str]:
        """Hydra overrides that set this layout on top of the plan's base overrides."""
        out = [
            f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.parallel_fields().items()
        ]
        out += [
            f"train.micro_batch_size={self.micro_batch}",
            f"train.grad_accum={self.grad_accum}",
            f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}",
            f"optim.in_backward={str(self.in_backward).lower()}",
        ]
        if self.precision:  # every field, so they compose over any precision group of the base
            out += [f"precision.{k}={str(v).lower()}" for k, v in PRECISIONS[self.precision].items()]
        return out


# Precision presets (`--precision`), each every field of the `precision` section but act_group_size: the plain
# ones of conf/precision/, their bf16-weight variants (no fp32 master: megaeff/optim/per_param.py) and FP8
# activations alone (COAT's activation part on bf16 autocast, moments and GEMMs as bf16's).
_OFF = dict(autocast_bf16=False, fp8_optimizer_states=False, fp8_activations=False, fp8_gemm=False)
_COAT = dict(name="coat", autocast_bf16=True, fp8_optimizer_states=True, fp8_activations=True, fp8_gemm=True)
PRECISIONS: Dict[str, Dict[str, object]] = {
    "fp32": dict(name="fp32", **_OFF, param_dtype="fp32"),
    "bf16": dict(name="bf16", **_OFF, param_dtype="fp32"),
    "bf16_w16": dict(name="bf16", **_OFF, param_dtype="bf16"),
    "fp8act_w16": dict(name="coat", **{**_OFF, "autocast_bf16": True, "fp8_activations": True}, param_dtype="bf16"),
    "coat_bf16": dict(**_COAT, param_dtype="fp32"),
    "coat_bf16_w16": dict(**_COAT, param_dtype="bf16"),
}
# `--precision auto`: every preset but fp32, whose GEMMs run at the TF32 peak the cost model does not price.
AUTO_PRECISIONS = ("bf16", "bf16_w16", "fp8act_w16", "coat_bf16", "coat_bf16_w16")


def precision_of(cfg: Config, layout: Layout) -> PrecisionConfig:
    """The layout's precision section: its preset's fields over the base's, or the base's."""
    if not layout.precision:
        return cfg.precision
    fields = dict(PRECISIONS[layout.precision])
    fields["name"] = Precision[fields["name"]]
    fields["param_dtype"] = ParamDtype[fields["param_dtype"]]
    return replace(cfg.precision, **fields)


@dataclass
class Options:
    """What to enumerate (the CLI's knobs; defaults documented in docs/planner.md)."""

    max_micro_batch: int = 4
    cp_impls: Tuple[str, ...] = ("ring", "ulysses")
    gather_dtypes: Tuple[str, ...] = ("fp32", "bf16", "fp8")
    min_cp_tokens: int = 1024
    max_tp: Optional[int] = None  # default: the GPUs of a node
    max_pp: Optional[int] = None
    precisions: Tuple[str, ...] = ("",)  # PRECISIONS presets; "": the base config's


def apply(cfg: Config, layout: Layout) -> Config:
    """A copy of `cfg` with the layout's fields set (typed choices, as composing its overrides would)."""
    c = copy.deepcopy(cfg)
    p = c.parallel
    p.tp, p.cp, p.dp, p.pp = layout.tp, layout.cp, layout.dp, layout.pp
    p.sequence_parallel = layout.sequence_parallel
    p.pp_schedule, p.pp_virtual = PpSchedule[layout.pp_schedule], layout.pp_virtual
    p.cp_impl, p.cp_sharding = CpImpl[layout.cp_impl], CpSharding[layout.cp_sharding]
    p.dp_impl = DpImpl[layout.dp_impl]
    if layout.dp_impl == "fssdp":
        p.fssdp_gather_dtype = FssdpGatherDtype[layout.gather_dtype]
    c.train.micro_batch_size, c.train.grad_accum = layout.micro_batch, layout.grad_accum
    c.train.activation_checkpointing = layout.activation_checkpointing
    c.optim.in_backward = layout.in_backward
    c.precision = precision_of(c, layout)
    return c


def refusal(cfg: Config, layout: Layout) -> Optional[str]:
    """megaeff's own message if it refuses the layout (config and world-size checks), else None."""
    try:
        c = apply(cfg, layout)
        validate_sections(c)
        validate_world(c, layout.tp * layout.cp * layout.dp * layout.pp)
    except MegaeffError as exc:
        return str(exc)
    return None


def _powers_of_two_dividing(n: int, limit: int) -> List[int]:
    out, d = [], 1
    while d <= limit:
        if n % d == 0:
            out.append(d)
        d *= 2
    return out


def _degree_grid(world: int, gpus_per_node: int, n_layers: int, opts: Options) -> Iterator[Tuple[int, int, int, int]]:
    max_tp = opts.max_tp or gpus_per_node
    for tp in _powers_of_two_dividing(world, max_tp):
        for cp in _powers_of_two_dividing(world // tp, world):
            for pp in _powers_of_two_dividing(world // (tp * cp), opts.max_pp or n_layers):
                yield tp, cp, world // (tp * cp * pp), pp


def _variants(tp: int, cp: int, dp: int, pp: int, opts: Options) -> Iterator[Dict[str, object]]:
    pipes = [dict(pp_schedule="1f1b", pp_virtual=1)]
    if pp > 1:
        pipes.append(dict(pp_schedule="interleaved", pp_virtual=2))
    cps = [dict(cp_impl="ring", cp_sharding="zigzag")]
    if cp > 1:
        cps = [dict(cp_impl=i, cp_sharding="zigzag" if i == "ring" else "contiguous") for i in opts.cp_impls]
    dps = [dict(dp_impl="allreduce")]
    if dp * cp > 1:
        dps += [dict(dp_impl="fssdp", gather_dtype=g) for g in opts.gather_dtypes]
    for pipe in pipes:
        for cpv in cps:
            for dpv in dps:
                for ac in (False, True):
                    for inbw in (False, True):
                        yield {**pipe, **cpv, **dpv, "activation_checkpointing": ac, "in_backward": inbw}


def enumerate_layouts(
    cfg: Config, world: int, gpus_per_node: int, global_batch: int, opts: Options
) -> Tuple[List[Layout], List[Tuple[Layout, str, str]]]:
    """(valid candidates, [(layout, group, reason)] of the pruned and refused) for `world` ranks.

    `cfg`: the plan's base config (model, method, precision, data.seq_len), already validated."""
    seq_len, n_layers = cfg.data.seq_len, cfg.model.n_layers
    valid: List[Layout] = []
    rejected: List[Tuple[Layout, str, str]] = []
    for (tp, cp, dp, pp), prec in itertools.product(
        _degree_grid(world, gpus_per_node, n_layers, opts), opts.precisions
    ):
        for mb in _powers_of_two_dividing(global_batch, opts.max_micro_batch):
            if global_batch % (dp * mb):
                continue
            base = Layout(tp, cp, dp, pp, mb, global_batch // (dp * mb), sequence_parallel=tp > 1)
            if cp > 1 and seq_len // cp < opts.min_cp_tokens:
                rule = f"context shard {seq_len // cp} tokens < {opts.min_cp_tokens} (--min-cp-tokens)"
                rejected.append((base, "pruned", rule))
                continue
            for v in _variants(tp, cp, dp, pp, opts):
                layout = replace(base, **v, precision=prec)
                why = refusal(cfg, layout)
                if why is None:
                    valid.append(layout)
                else:
                    rejected.append((layout, "config refusal", why))
    if not valid and not rejected:
        raise MegaeffError(
            f"no layout: the global batch {global_batch} does not divide over any data-parallel degree of {world} ranks"
        )
    return valid, rejected


def first_stage_rank(layout: Layout, stage: int) -> int:
    """The global rank of (tp, cp, dp) = 0 on pipeline stage `stage` (pp outermost)."""
    return stage * layout.tp * layout.cp * layout.dp


def measured_ranks(layout: Layout) -> Sequence[int]:
    """The ranks whose cost differs: the first pipeline stage (embedding) and the last (head and loss)."""
    return [0] if layout.pp == 1 else [0, first_stage_rank(layout, layout.pp - 1)]
