"""Where the experts of a MoE layer run in one forward: the placement of their replicas over the dp x cp group
and the plan of the token exchange it implies (megaeff/distributed/expert_parallel/experts.py runs it).

Placement (`plan_placement`, FSSDP): capacity is `slots` experts per rank, slots x p in all (default: one more
than EP's share, ceil(E/p) + 1, so a hot expert can be replicated). Replicas: one per expert, then each spare
slot to the expert with the largest load per replica (D'Hondt, i.e. proportional to load; ties to the lower
expert; at most p replicas). Ranks: the replicas, sorted by load per replica (descending, then expert), are
dealt in rounds of p, one per rank per round, each to the least-loaded rank still free in that round and not
hosting that expert. An expert's replicas are adjacent in that order, so only the first expert of a round can
meet a rank that already hosts it, and at most r_e - 1 <= p - 1 ranks do: the deal never gets stuck. Finally
each expert's hosts are put in rank order, so that replica j's range of rows (rows are ordered by source rank)
overlaps its host's own tokens where it can. EP's placement is fixed: expert e on rank e mod p.

`StepPlan`: from the all-gathered counts C[s, e] (tokens of rank s routed to expert e) every rank computes the
same placement and the same table of rows that source s sends to replica j of expert e: the global rows of e
(ordered by source rank, then by position) are cut into r_e equal ranges (`replica_rows`). It holds this rank's
split sizes, the permutations between routing order, exchange order and expert order, and the step's
statistics (`ExpertStepStats`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import List, NamedTuple, Sequence, Tuple

import torch

from megaeff.models.moe import inverse_permutation


class Placement(NamedTuple):
    hosts: Tuple[Tuple[int, ...], ...]  # per expert: the rank of replica j at position j (FSSDP: ascending)
    hosted: Tuple[Tuple[int, ...], ...]  # per rank: the experts it hosts, ascending

    @property
    def replicas(self) -> List[int]:
        return [len(h) for h in self.hosts]


def _from_hosts(hosts: Sequence[Sequence[int]], world: int) -> Placement:
    hosted = [[] for _ in range(world)]
    for e, ranks in enumerate(hosts):
        for d in ranks:
            hosted[d].append(e)
    return Placement(tuple(tuple(h) for h in hosts), tuple(tuple(sorted(h)) for h in hosted))


def replica_rows(load: int, replicas: int) -> List[int]:
    """Rows of each replica when `load` global rows are cut into `replicas` ranges (the larger ones last)."""
    return [(j + 1) * load // replicas - j * load // replicas for j in range(replicas)]


def plan_placement(loads: Sequence[int], world: int, slots: int) -> Placement:
    """Replicas proportional to load and their ranks, a pure function of (loads, world, slots)."""
    n = len(loads)
    if not 1 <= slots <= n or slots * world < n:
        raise ValueError(
            f"{slots} expert slots per rank cannot host {n} experts on {world} ranks (need {n} >= slots >= {n}/{world})"
        )
    replicas = [1] * n
    heap = [(-loads[e], e) for e in range(n) if world > 1]
    heapq.heapify(heap)
    for _ in range(slots * world - n):
        _, e = heapq.heappop(heap)
        replicas[e] += 1
        if replicas[e] < world:
            heapq.heappush(heap, (-loads[e] / replicas[e], e))
    items = sorted(
        ((e, j) for e in range(n) for j in range(replicas[e])), key=lambda it: (-loads[it[0]] / replicas[it[0]], it)
    )
    rank_load = [0] * world
    hosts: List[List[int]] = [[] for _ in range(n)]
    for start in range(0, len(items), world):
        free = set(range(world))
        for e, j in items[start : start + world]:
            d = min((d for d in free if d not in hosts[e]), key=lambda d: (rank_load[d], d))
            free.discard(d)
            hosts[e].append(d)
            rank_load[d] += replica_rows(loads[e], replicas[e])[j]
    # Replica j takes the j-th range of the expert's rows, which are ordered by source rank: with hosts in rank
    # order, a host's range overlaps its own tokens where it can, and no replica's size moves by more than a row.
    return _from_hosts([sorted(h) for h in hosts], world)


def fixed_placement(n_experts: int, world: int) -> Placement:
    return _from_hosts([[e % world] for e in range(n_experts)], world)


@dataclass
class ExpertStepStats:
    loads: List[int]  # global tokens per expert
    hosts: List[List[int]]  # per expert, the ranks of its replicas
    rows_per_rank: List[int]  # token rows each rank's experts process
    straggler: float  # max / mean of rows_per_rank (1 = balanced)
    token_rows_off_rank: int  # rows that leave their rank in one token exchange (dispatch; combine the same)
    param_elems_off_rank: int  # elements that leave their rank in one sparse all-gather (0 for EP)


class StepPlan:
    """One forward's exchange, from the all-gathered counts C [world][E]; identical on every rank but for the
    index tensors of `rank`."""

    def __init__(self, counts: List[List[int]], placement: Placement, rank: int, shard: int, param_moves: bool):
        world, n = len(counts), len(counts[0])
        self.placement, self.hosted_here = placement, placement.hosted[rank]
        loads = [sum(counts[s][e] for s in range(world)) for e in range(n)]
        # piece[s][e][j]: the local row range [lo, hi) of source s's rows of e that replica j processes.
        piece = [[[] for _ in range(n)] for _ in range(world)]
        for e in range(n):
            r = len(placement.hosts[e])
            bounds = [j * loads[e] // r for j in range(r + 1)]
            offset = 0
            for s in range(world):
                c = counts[s][e]
                for j in range(r):
                    lo, hi = max(bounds[j], offset), min(bounds[j + 1], offset + c)
                    piece[s][e].append((lo - offset, max(lo, hi) - offset))
                offset += c
        slot = {(e, d): j for e in range(n) for j, d in enumerate(placement.hosts[e])}

        def rows(s, e, d):
            lo, hi = piece[s][e][slot[(e, d)]]
            return hi - lo

        send = [[sum(rows(s, e, d) for e in placement.hosted[d]) for d in range(world)] for s in range(world)]
        self.send_splits = send[rank]
        self.recv_splits = [send[s][rank] for s in range(world)]
        start = [0]
        for c in counts[rank]:
            start.append(start[-1] + c)
        perm = [
            torch.arange(start[e] + lo, start[e] + hi)
            for d in range(world)
            for e in placement.hosted[d]
            for lo, hi in [piece[rank][e][slot[(e, d)]]]
        ]
        self.send_perm = torch.cat(perm) if perm else torch.zeros(0, dtype=torch.long)
        # Received rows come by (source, hosted expert); the experts want them by (hosted expert, source).
        base, blocks = 0, {}
        for s in range(world):
            for e in self.hosted_here:
                k = rows(s, e, rank)
                blocks[(e, s)] = torch.arange(base, base + k)
                base += k
        grouped = [blocks[(e, s)] for e in self.hosted_here for s in range(world)]
        self.group_perm = torch.cat(grouped) if grouped else torch.zeros(0, dtype=torch.long)
        self.group_inv = inverse_permutation(self.group_perm)
        self.expert_rows = [sum(rows(s, e, rank) for s in range(world)) for e in self.hosted_here]
        processed = [sum(send[s][d] for s in range(world)) for d in range(world)]
        mean = sum(processed) / world
        moved = sum(len(placement.hosted[d]) * shard * (world - 1) for d in range(world)) if param_moves else 0
        self.stats = ExpertStepStats(
            loads=loads,
            hosts=[list(h) for h in placement.hosts],
            rows_per_rank=processed,
            straggler=max(processed) / mean if mean else 1.0,
            token_rows_off_rank=sum(send[s][d] for s in range(world) for d in range(world) if s != d),
            param_elems_off_rank=moved,
        )
