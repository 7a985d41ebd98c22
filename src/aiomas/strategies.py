"""Hypothesis strategies for the fault plans of :mod:`aiomas.simulation`.

Needs hypothesis (``pip install aiomas[simulation]``).  Hypothesis draws plans
from these strategies and, when a test fails, shrinks the plan towards fewer
and smaller faults (no partition, no crash, probabilities and delays towards
zero), so the plan it reports is close to the least that still breaks the
system::

    @given(plan=fault_plans(["sim-0", "sim-1", "sim-2"], horizon=60))
    def test_election(plan):
        simulation.run(elect, seed=0, plan=plan)
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from aiomas.simulation import Crash, FaultPlan, LinkFaults, Partition

__all__ = ["crashes", "fault_plans", "link_faults", "partitions"]


def link_faults(
    max_latency: float = 0.1, max_probability: float = 0.2
) -> st.SearchStrategy[LinkFaults]:
    """:class:`~aiomas.simulation.LinkFaults` with delays up to *max_latency*
    seconds and drop, duplicate and reorder probabilities up to
    *max_probability*."""
    delay = st.floats(0, max_latency, allow_nan=False)
    probability = st.floats(0, max_probability, allow_nan=False)
    return st.builds(
        LinkFaults,
        latency=delay,
        jitter=delay,
        jitter_shape=st.sampled_from(["uniform", "exponential"]),
        drop=probability,
        duplicate=probability,
        reorder=probability,
        reorder_window=st.integers(1, 4),
        bandwidth=st.none() | st.floats(1e3, 1e9, allow_nan=False),
    )


def partitions(nodes: Sequence[str], horizon: float) -> st.SearchStrategy[Partition]:
    """A :class:`~aiomas.simulation.Partition` between two disjoint,
    non-empty groups of *nodes* that starts within *horizon* seconds.

    Raises:
        ValueError: if there are fewer than two nodes.
    """
    if len(nodes) < 2:
        raise ValueError("A partition needs at least two nodes")
    names = list(nodes)

    @st.composite
    def draw(data: st.DrawFn) -> Partition:
        order = data(st.permutations(names))
        cut = data(st.integers(1, len(order) - 1))
        return Partition(
            tuple(order[:cut]),
            tuple(order[cut:]),
            start=data(st.floats(0, horizon, allow_nan=False)),
            duration=data(st.floats(0, horizon, allow_nan=False)),
            one_way=data(st.booleans()),
        )

    return draw()


def crashes(nodes: Sequence[str], horizon: float) -> st.SearchStrategy[Crash]:
    """A :class:`~aiomas.simulation.Crash` of one of *nodes* within *horizon*
    seconds, with a restart within *horizon* seconds after it (or none)."""
    return st.builds(
        Crash,
        node=st.sampled_from(list(nodes)),
        at=st.floats(0, horizon, allow_nan=False),
        restart_after=st.none() | st.floats(0, horizon, allow_nan=False),
    )


def fault_plans(
    nodes: Sequence[str],
    horizon: float = 60.0,
    *,
    max_partitions: int = 2,
    max_crashes: int = 1,
    link: st.SearchStrategy[LinkFaults] | None = None,
) -> st.SearchStrategy[FaultPlan]:
    """A :class:`~aiomas.simulation.FaultPlan` for *nodes*: default link
    faults from *link* (default :func:`link_faults`), up to *max_partitions*
    partitions and *max_crashes* crashes within *horizon* seconds, and maybe
    a dead-peer timeout."""
    link = link_faults() if link is None else link
    cuts = (
        st.lists(partitions(nodes, horizon), max_size=max_partitions)
        if len(nodes) >= 2
        else st.just([])
    )
    return st.builds(
        FaultPlan,
        default=link,
        partitions=cuts.map(tuple),
        crashes=st.lists(crashes(nodes, horizon), max_size=max_crashes).map(tuple),
        dead_peer_timeout=st.none() | st.floats(0.1, horizon, allow_nan=False),
    )
