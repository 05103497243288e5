"""Schedules as data and the dry-run simulator."""

from functools import partial

import pytest

from localnet.schedules import (STEP, B, DeadlockError, F, Schedule, check_schedule,
                                make_schedule, simulate)

gpipe, one_f_one_b, async_ = (partial(make_schedule, n) for n in ("gpipe", "1f1b", "async"))

SIZES = [(S, M) for S in (1, 2, 3, 4, 6) for M in (1, 2, 3, 4, 8)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("dfa", [False, True])
def test_every_schedule_runs_without_deadlock(name, dfa):
    for S, M in SIZES:
        sched = make_schedule(name, S, M)
        check_schedule(sched)
        res = simulate(sched, [1.0 + s / 10 for s in range(S)], 2.0, comm_cost=0.25, dfa=dfa)
        assert len(res.trace) == S * (2 * M + 1)
        assert res.makespan > 0 and 0 <= res.bubble_fraction < 1


@pytest.mark.parametrize("S, M", SIZES)
def test_gpipe_bubble_matches_formula(S, M):
    res = simulate(gpipe(S, M), 1.0, 1.0, batch_size=32)
    assert res.bubble_fraction == pytest.approx((S - 1) / (M + S - 1))
    assert res.makespan == pytest.approx((M + S - 1) * 2.0)
    assert res.samples_per_s == pytest.approx(32 / res.makespan)
    assert res.busy == [2.0 * M] * S


def test_1f1b_same_time_less_memory():
    for S, M in [(2, 4), (4, 8), (6, 8)]:
        g, o = simulate(gpipe(S, M), 1.0, 2.0), simulate(one_f_one_b(S, M), 1.0, 2.0)
        assert o.makespan == pytest.approx(g.makespan)
        assert g.peak_activations == [M] * (S - 1) + [1]  # the last stage: F(m) B(m)
        assert o.peak_activations == [min(S - s, M) for s in range(S)]


def test_1f1b_layout():
    sched = one_f_one_b(3, 4)
    assert sched.stages[0] == [F(0), F(1), F(2), B(0), F(3), B(1), B(2), B(3), STEP]
    assert sched.stages[2] == [F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3), STEP]


def test_hop_cost_is_charged_to_the_receiving_action():
    """The data plane's CPU per message lands on the action that receives it; the
    coordinator's one call per actor per batch once per stage."""
    S, M = 2, 4
    base, h = simulate(gpipe(S, M), 1.0, 2.0), 0.5
    with_hops = simulate(gpipe(S, M), 1.0, 2.0, hop_cost=h)
    # stage 0 receives M errors, stage 1 M activations (its own error is local)
    assert with_hops.busy == pytest.approx([b + h * M for b in base.busy])
    # a message's CPU may depend on the message: activations up cost 0.5, errors 0.25
    by_kind = simulate(gpipe(S, M), 1.0, 2.0,
                       hop_cost=lambda src, dst, op: 0.5 if op == "F" else 0.25)
    assert by_kind.busy == pytest.approx([base.busy[0] + 0.25 * M, base.busy[1] + 0.5 * M])
    with_call = simulate(gpipe(S, M), 1.0, 2.0, call_cost=0.25)
    assert with_call.busy == pytest.approx([b + 0.25 for b in base.busy])
    # DFA: stage 0's B(0) needs only the last stage's F(0), which produced e
    dfa = simulate(gpipe(2, 2), 1.0, 2.0, dfa=True)
    starts = {(s, a): t0 for s, a, t0, _ in dfa.trace}
    assert starts[(1, F(0))] == 1.0 and starts[(0, B(0))] == 2.0


def test_feed_waits_for_the_last_stage_to_finish_the_batch_before():
    """async streamed: the coordinator feeds batch b once the last actor's call for
    batch b-1 returned, i.e. after its last forward of that batch (the loss; the
    backward and update of that micro-batch open its next call)."""
    sched = make_schedule("async", 2, 4)  # two batches of 2
    res = simulate(sched, 1.0, 1.0, step_cost=0.5, feed=2)
    ends = {(s, a): t1 for s, a, _, t1 in res.trace}
    starts = {(s, a): t0 for s, a, t0, _ in res.trace}
    from localnet.schedules import STEP_MB
    assert starts[(0, F(2))] == pytest.approx(ends[(1, F(1))])
    assert starts[(0, F(2))] < ends[(1, STEP_MB(1))]


def test_broken_schedule_deadlocks_and_names_the_stuck_actions():
    # stage0 wants B(0) before F(1); stage1 wants F(1) before B(0): a cycle
    bad = Schedule("bad", [[F(0), B(0), F(1), B(1), STEP], [F(0), F(1), B(0), B(1), STEP]], 2)
    with pytest.raises(DeadlockError) as info:
        simulate(bad, 1.0, 1.0)
    msg = str(info.value)
    assert "stage0 B(0) waits for stage1 B(0)" in msg
    assert "stage1 F(1) waits for stage0 F(1)" in msg
    assert {(s, str(a)) for s, a, _ in info.value.stuck} == {(0, "B(0)"), (1, "F(1)")}
    # a backward before its own forward is stuck too
    with pytest.raises(DeadlockError, match="stage0 B"):
        simulate(Schedule("bad", [[B(0), F(0), STEP]], 1), 1.0, 1.0)


def test_dfa_backwards_need_only_the_output_error():
    # under DFA every stage's backward can start as soon as the last forward produced e
    S, M = 4, 4
    chain, dfa = simulate(gpipe(S, M), 1.0, 1.0), simulate(gpipe(S, M), 1.0, 1.0, dfa=True)
    assert dfa.makespan < chain.makespan
    # stage0 runs B(0) before F(1) while stage1 runs F(1) before B(0): a deadlock when errors
    # travel down the chain, fine under DFA (stage0's B(0) needs only stage1's F(0))
    crossed = Schedule("x", [[F(0), B(0), F(1), B(1), STEP], [F(0), F(1), B(0), B(1), STEP]], 2)
    with pytest.raises(DeadlockError):
        simulate(crossed, 1.0, 1.0)
    simulate(crossed, 1.0, 1.0, dfa=True)


def test_comm_cost_and_structure_checks():
    base, slow = simulate(gpipe(3, 4), 1.0, 1.0), simulate(gpipe(3, 4), 1.0, 1.0, comm_cost=0.5)
    assert slow.makespan == pytest.approx(base.makespan + 2 * 2 * 0.5)  # 2 hops up, 2 down
    with pytest.raises(ValueError, match="once each"):
        check_schedule(Schedule("x", [[F(0), F(0), B(0), STEP]], 1))
    with pytest.raises(ValueError, match="end with exactly one STEP"):
        check_schedule(Schedule("x", [[F(0), STEP, B(0)]], 1))
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("zigzag", 2, 2)
    with pytest.raises(ValueError, match="3 stages"):
        simulate(gpipe(3, 2), [1.0, 1.0], 1.0)


# ---------------------------------------------------------------------------- graphs, async
from localnet.schedules import (STEP_MB, AsyncStream, depths, staleness,  # noqa: E402
                                stream_staleness, take_lags)

# ResNet-8 per layer: stem, (conv1, merge) x 3, head; a merge reads conv1 and the skip
RESNET8 = [[-1], [0], [1, 0], [2], [3, 2], [4], [5, 4], [6]]
# ResNet-18-like block with a projection: conv1 and shortcut both read stage 0
PROJ = [[-1], [0], [0], [1, 2], [3]]


@pytest.mark.parametrize("graph", [None, RESNET8, PROJ])
@pytest.mark.parametrize("name", ["gpipe", "1f1b", "async"])
@pytest.mark.parametrize("dfa", [False, True])
def test_every_schedule_on_every_graph_runs_without_deadlock(graph, name, dfa):
    for M in (1, 2, 3, 8):
        S = len(graph) if graph else 4
        sched = make_schedule(name, S, M, graph)
        check_schedule(sched)
        res = simulate(sched, 1.0, 2.0, comm_cost=0.1, step_cost=0.05, dfa=dfa)
        steps = M if name == "async" else 1
        assert len(res.trace) == S * (2 * M + steps)


def test_depths_and_1f1b_on_a_graph():
    assert depths(RESNET8) == [7, 6, 5, 4, 3, 2, 1, 0]
    assert depths(PROJ) == [3, 2, 2, 1, 0]
    sched = one_f_one_b(5, 8, PROJ)
    res = simulate(sched, 1.0, 1.0)
    assert res.peak_activations == [4, 3, 3, 2, 1]   # d(s) + 1 in flight, not M
    assert res.makespan == pytest.approx(simulate(gpipe(5, 8, PROJ), 1.0, 1.0).makespan)


def test_async_layout_and_staleness():
    sched = async_(3, 4)
    assert sched.stages[0] == [F(0), F(1), F(2), B(0), STEP_MB(0), F(3), B(1), STEP_MB(1),
                               B(2), STEP_MB(2), B(3), STEP_MB(3)]
    assert staleness(sched) == [2, 1, 0] and staleness(one_f_one_b(3, 4)) == [0, 0, 0]
    assert staleness(async_(8, 2, RESNET8)) == [1] * 7 + [0]  # one batch: at most M - 1
    assert stream_staleness(RESNET8, 8) == [7, 6, 5, 4, 3, 2, 1, 0]  # streamed: d(s)
    with pytest.raises(ValueError, match=r"STEP\(0\) before B\(0\)"):
        check_schedule(Schedule("x", [[F(0), STEP_MB(0), B(0)]], 1))


def test_async_beats_1f1b_when_streamed():
    """Without the flush, K batches pay the fill/drain bubble once."""
    S, M, K = 4, 4, 8
    flushed = K * simulate(one_f_one_b(S, M), 1.0, 2.0).makespan
    streamed = simulate(async_(S, M * K), 1.0, 2.0).makespan
    assert streamed < 0.8 * flushed


def test_async_stream_take_and_drain_cover_every_action_once():
    for d in (0, 1, 3, 6):
        st, got = AsyncStream(d), []
        for limit in (4, 8, 12):
            got += st.take(limit)
        got += st.drain(12)
        for g in range(12):
            assert [a for a in got if a.mb == g] == [F(g), B(g), STEP_MB(g)]
        assert st.take(14)[:1] == [F(12)]  # a fresh warm-up after the drain


def test_the_last_stage_stream_cut_after_its_forward_keeps_every_action_in_order():
    """The runtime cuts the last stage's stream right after each batch's last forward
    (its call returns with the loss): the pieces join into the same list as the default
    cut, so the maths is the same; only where one call ends and the next begins moves."""
    for d in (0, 1, 3):
        for M in (1, 4):
            a, b = AsyncStream(d), AsyncStream(d)
            got_a, got_b = [], []
            for k in range(1, 6):
                got_a += a.take(M * k)
                piece = b.take(M * k, to_forward=True)
                assert piece[-1] == F(M * k - 1)
                got_b += piece
            assert got_a + a.drain(5 * M) == got_b + b.drain(5 * M)


@pytest.mark.parametrize("graph", [None, RESNET8, PROJ])
@pytest.mark.parametrize("dfa", [False, True])
def test_take_lags_bound_every_error_of_the_streamed_pieces(graph, dfa):
    """Cut every stage's stream into batch pieces as the runtime does (the last stage
    right after its forwards), and find in which piece each error is sent and taken: a
    chain error at the sender's B(g), DFA's e at the last stage's F(g), each taken at the
    receiver's B(g).  A sender may wait for a send only `take_lags` (default 2) calls
    later, so every lag must stay below that; with one micro-batch per batch, DFA's e to
    the first stage takes exactly d(0) calls, the bound's tightest case."""
    S = len(graph) if graph else 5
    g8 = graph or [[-1]] + [[s - 1] for s in range(1, S)]
    d, last = stream_staleness(graph, S), S - 1
    for M in (1, 2, 3, 4):
        streams, where = [AsyncStream(x) for x in d], {}
        K = 3 * S  # batches: enough that every stage reaches its steady state
        for k in range(K):
            for s, st in enumerate(streams):
                for a in st.take(M * (k + 1), to_forward=s == last):
                    where[(s, a)] = k
        lags = []
        for g in range(M * K - 2 * S):  # micro-batches every stage finished in the pieces
            for t in range(last):
                senders = [last] if dfa else [c for c in range(S) if t in g8[c]]
                for src in senders:
                    sent = where[(src, F(g) if dfa else B(g))]
                    lag = where[(t, B(g))] - sent
                    assert 0 <= lag < take_lags(graph, S, src).get(t, 2), (src, t, g, M)
                    lags.append((lag, src, t))
        if dfa and M == 1:
            assert max(lags) == (d[0], last, 0) and take_lags(graph, S, last)[0] == d[0] + 1


def test_streamed_two_stages_keep_both_busy():
    """Fed batch by batch, 2 stages with F = 1 and B = 2 each: one batch every 3 s in the
    steady state, each stage's own work -- the first stage forwards the next batch while
    the last one does this batch's last backward."""
    for M in (1, 4):
        spans = [simulate(async_(2, M * k), 1.0, 2.0, feed=M).makespan for k in (2, 6)]
        assert (spans[1] - spans[0]) / 4 == pytest.approx(3.0 * M)


def test_deadlock_on_a_graph_names_the_skip_edge():
    # stage 0 feeds stages 1 and 2 (the skip); stage 0 backwards mb 0 before forwarding
    # mb 1, but stage 2 (the merge) waits for F(1) before it backwards mb 0
    bad = Schedule("bad", [[F(0), B(0), F(1), B(1), STEP],
                           [F(0), B(0), F(1), B(1), STEP],
                           [F(0), F(1), B(0), B(1), STEP]], 2, [[-1], [0], [1, 0]])
    with pytest.raises(DeadlockError) as info:
        simulate(bad, 1.0, 1.0)
    msg = str(info.value)
    assert "stage0 B(0) waits for stage1 B(0), stage2 B(0)" in msg   # errors along both edges
    assert "stage2 F(1) waits for stage1 F(1), stage0 F(1)" in msg   # the skip's activation


def test_feed_holds_each_batch_until_the_last_forward_of_the_one_before():
    """Streamed async: train_step feeds batch b once the loss of b-1 is back."""
    S, M, K = 4, 2, 5
    sched = async_(S, M * K)
    free = simulate(sched, 1.0, 2.0)
    fed = simulate(sched, 1.0, 2.0, feed=M)
    def times(res):
        return {(s, a): (t0, t1) for s, a, t0, t1 in res.trace}
    tf, tx = times(fed), times(free)
    for b in range(1, K):
        assert tf[(0, F(b * M))][0] >= tf[(S - 1, F(b * M - 1))][1]
    # without it, stage 0 runs ahead of the loss (which is why the prediction was high)
    assert any(tx[(0, F(b * M))][0] < tx[(S - 1, F(b * M - 1))][1] for b in range(1, K))
    assert fed.makespan > free.makespan
    # one batch at a time already waits for nothing more
    assert simulate(gpipe(S, M), 1.0, 2.0, feed=M).makespan == simulate(gpipe(S, M), 1.0, 2.0).makespan


def test_a_batch_issued_ahead_waits_only_for_the_loss_two_batches_back():
    """ahead=1: the coordinator issues batch b once batch b-2's loss is back, so the
    first stage never idles through a forward across the pipeline; the steady period
    is then the busiest stage's own work, M x (F + B), not the 1.67x of one at a time."""
    S, M, K = 11, 4, 6
    sched = async_(S, M * K)
    one, two = (simulate(sched, 1.0, 2.0, feed=M, ahead=a) for a in (0, 1))
    t = {(s, a): (t0, t1) for s, a, t0, t1 in two.trace}
    assert all(t[(0, F(b * M))][0] >= t[(S - 1, F((b - 1) * M - 1))][1] for b in range(2, K))
    # ... and no later: batch b's first forward starts before b-1's loss is back
    assert any(t[(0, F(b * M))][0] < t[(S - 1, F(b * M - 1))][1] for b in range(2, K))

    def period(a):
        spans = [simulate(async_(S, M * k), 1.0, 2.0, feed=M, ahead=a).makespan
                 for k in (4, 10)]
        return (spans[1] - spans[0]) / 6
    assert period(1) == pytest.approx(M * 3.0) and period(0) == pytest.approx(20.0)
    assert two.makespan < one.makespan
    # the maths is the same: every stage runs the same list in the same order
    for s in range(S):
        order = [[a for st, a, *_ in r.trace if st == s] for r in (one, two)]
        assert order[0] == order[1]
    with pytest.raises(ValueError, match="ahead"):
        simulate(sched, 1.0, 2.0, feed=M, ahead=-1)


def test_an_update_does_not_hold_back_the_error_below():
    """The last stage's STEP is a call of its own (it sends errors down): stage 0's
    last backward starts when that error exists, not after the update.  gpipe, 2 x 2,
    forward and backward 1 s, stage 1's update 5 s: stage 1 F(0)B(0) [1, 3], F(1)B(1)
    [3, 5], STEP [5, 10]; stage 0 B(1) from 5 (fused with the STEP it would wait to 10)."""
    sim = simulate(gpipe(2, 2), 1.0, 1.0, step_cost=[0.0, 5.0])
    starts = {(s, a): t0 for s, a, t0, _ in sim.trace}
    assert starts[(0, B(1))] == 5.0 and starts[(1, STEP)] == 5.0
    assert sim.makespan == pytest.approx(10.0)
