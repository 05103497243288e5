"""localnet.channels: codecs, faulty channels, and their in-process integration."""

import math

import pytest
import torch

from localnet.channels import Channel, make_codec
from localnet.channels.channel import FidelityWindow, fidelity, summarize
from localnet.channels.codecs import Int8, LowRank, TopK
from localnet.channels.wire import pack, unpack
from localnet.config import ConfigError, load_config
from localnet.engine import loss_and_error
from localnet.train import build


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def small(*extra):
    return load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[16,16]",
                              "train.batch_size=32", "train.lr=0.05", "train.weight_decay=1e-3",
                              "rule.name=fa", *extra])


def batches(data, n, bs=32):
    out = []
    for x, y in data.train_loader(bs, 0, 0):
        out.append((x, y))
        if len(out) == n:
            return out
    return out


# ------------------------------------------------------------------------- codecs
def test_int8_nearest_error_at_most_half_a_step_and_bytes():
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    c = Int8(stochastic=False)
    enc = c.encode(x)
    s = enc.payload["scale"].item()
    assert s == pytest.approx(x.abs().max().item() / 127)
    assert (c.decode(enc) - x).abs().max().item() <= s / 2 + 1e-7
    assert enc.nbytes == x.numel() + 4 and enc.payload["q"].dtype == torch.int8


def test_int8_stochastic_rounding_is_unbiased_and_within_one_step():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, generator=g)
    c = Int8()  # stochastic by default
    s = c.scale(x).item()
    mean = torch.zeros_like(x)
    trials = 4000
    for _ in range(trials):
        d = c.decode(c.encode(x, g))
        assert (d - x).abs().max().item() < s * (1 + 1e-5)
        mean += d / trials
    # per entry the rounding error has std <= s/2, so the mean's std <= s/(2 sqrt(trials))
    assert (mean - x).abs().max().item() < 5 * s / (2 * math.sqrt(trials))
    # nearest rounding is biased on the same input: much larger systematic error
    near = Int8(stochastic=False)
    assert (near.decode(near.encode(x)) - x).abs().max().item() > 0.2 * s


def test_int8_per_channel_scales():
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    enc = Int8(per_channel=True).encode(x, torch.Generator().manual_seed(0))
    assert enc.payload["scale"].shape == (1, 3, 1, 1)
    assert enc.nbytes == x.numel() + 3 * 4
    err = (Int8(per_channel=True).decode(enc) - x).abs().amax(dim=(0, 2, 3))
    assert (err <= enc.payload["scale"].view(3) * (1 + 1e-5)).all()


@pytest.mark.parametrize("name,size", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_float_codecs_bytes_and_roundtrip(name, size):
    x = torch.randn(7, 9)
    c = make_codec(name)
    enc = c.encode(x)
    assert enc.nbytes == x.numel() * size
    d = c.decode(enc)
    assert d.dtype == x.dtype and d.shape == x.shape
    if name == "fp32":
        assert torch.equal(d, x)
    else:
        assert torch.allclose(d, x, rtol=1e-2, atol=1e-2)


def test_topk_keeps_exactly_k_entries():
    x = torch.randn(10, 30, generator=torch.Generator().manual_seed(2))
    c = TopK(k=0.1)
    enc = c.encode(x)
    d = c.decode(enc)
    kept = int(round(0.1 * x.numel()))
    assert (d != 0).sum().item() == kept == 30
    # the kept entries are the largest in magnitude, unchanged
    top = x.abs().reshape(-1).topk(kept).indices
    assert torch.equal(d.reshape(-1)[top], x.reshape(-1)[top])
    # 4-byte values + 2-byte indices (n = 300 needs more than one byte)
    assert enc.nbytes == kept * (4 + 2)


@pytest.mark.parametrize("name, lost", [("topk", 0.5), ("sign", 0.2), ("lowrank", 0.5)])
def test_error_feedback_resends_the_residual(name, lost):
    """Top-k drops 90% of the entries, sign rounds each to one magnitude, a rank-8
    projection keeps 8 of 50 dimensions: over 200 messages their sum misses the inputs'
    by 64%, 31% and 85%.  With error feedback nothing is lost, only late."""
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(50, generator=g) + 0.5 for _ in range(200)]
    total = torch.stack(inputs).sum(0)
    for ef in (True, False):
        c = make_codec(name, error_feedback=ef)
        sent = torch.zeros(50)
        for x in inputs:
            sent += c.decode(c.encode(x))
        gap = (sent - total).norm() / total.norm()
        if ef:
            # what was sent plus what is held back is the input
            assert torch.allclose(sent + c.residual, total, atol=1e-3)
            assert gap < 0.05
        else:
            assert gap > lost


def test_topk_keeps_a_softmax_errors_target_entries_and_loses_its_zero_sum():
    """DFA's error e = softmax - onehot sums to 0 per sample, and its largest entry is
    always the target's (|p_y - 1| is the sum of the others).  So topk without error
    feedback keeps targets' entries, and what arrives sums well below 0: every hidden
    layer gets one push at every step, which blew DFA up at every rate tried.  Error
    feedback sends the rest later (the test above): its running sum keeps e's."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 0.5  # early in training: near-uniform
    y = torch.randint(0, 10, (64,), generator=g)
    target = torch.nn.functional.one_hot(y, 10).bool()
    e = logits.softmax(1) - target.float()
    assert torch.equal(e.abs().argmax(1), y)
    c = TopK(k=0.1)
    d = c.decode(c.encode(e))
    kept = d != 0
    assert kept.sum() == 64 and (kept & target).sum() == 64  # only targets' entries
    assert abs(e.sum()) < 1e-4 and d.sum() < -0.4 * e.abs().sum()
    assert c.bias() is not None and TopK(k=0.1, error_feedback=True).bias() is None
    ef = TopK(k=0.1, error_feedback=True)
    arrived = sum(ef.decode(ef.encode(e)) for _ in range(20))
    assert abs(arrived.sum() + ef.residual.sum()) < 1e-3  # 20 messages of sum 0: 0


def test_lowrank_error_feedback_sends_the_full_norm_mostly_other_samples_residual():
    """With error feedback a rank-q projection of n keeps a residual of (n - q)/q times
    the error's squared norm in steady state (r' = (r + e)(I - P P^T), P fresh each
    message), so each message carries as much as the whole error, of which only q/n lies
    along the sample's own error: at q = n/8, 98% of what arrives is earlier messages'
    rest, paired with this message's inputs.  On FA at lr 0.01 that blew q = 64 up, and
    q = 256 and 384 trained (RESULTS.md, "lowrank with error feedback")."""
    g = torch.Generator().manual_seed(0)
    for q in (64, 256):
        c = make_codec("lowrank", q=q, error_feedback=True, seed=1)
        rest, sent, own = [], [], []
        for step in range(300):
            e = torch.randn(16, 512, generator=g)
            m = c.decode(c.encode(e))
            if step >= 100:  # settled
                rest.append(c.residual.square().sum() / e.square().sum())
                sent.append(m.square().sum() / e.square().sum())
                own.append((m * e).sum() / e.square().sum())
        assert torch.stack(rest).mean() == pytest.approx((512 - q) / q, rel=0.03)
        assert torch.stack(sent).mean() == pytest.approx(1.0, rel=0.03)
        assert torch.stack(own).mean() == pytest.approx(q / 512, rel=0.05)


def test_fidelity_is_what_each_codec_keeps_of_its_messages_direction_and_norm():
    """A link's fidelity (`Channel.stats`: over all its messages x and their decodes d
    as one, cos = sum<d, x> / sqrt(sum|d|^2 sum|x|^2) and norm ratio sqrt(sum|d|^2 /
    sum|x|^2)) against each codec's exact value: fp32 keeps both (1, 1); one-scale sign
    decodes x as s sign(x), s = mean|x|, so <d, x> = |d|^2 = n s^2 and both are
    sqrt(sum n s^2 / sum|x|^2); a projection d = x P P^T has <d, x> = |d|^2 too, so its
    cosine equals its norm ratio (about sqrt(q/n) on random rows).  An all-zero message
    (an error through ReLUs that were all off) adds nothing and is not counted."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 64, generator=g) * (i + 1) for i in range(5)]

    def link(name, **options):
        ch = Channel(make_codec(name, **options), src="a", dst="b", kind="error", seed=0)
        for x in xs + [torch.zeros(8, 64)]:
            ch.transmit(x)
        return ch.stats(1)

    s = link("fp32")
    assert (s["measured"], s["cos"], s["norm_ratio"], s["rest"]) == (5, 1.0, 1.0, 0.0)
    s = link("sign")
    want = math.sqrt(sum(x.numel() * x.abs().mean() ** 2 for x in xs)
                     / sum(x.square().sum() for x in xs))
    assert s["measured"] == 5
    assert s["cos"] == pytest.approx(want, rel=1e-5)
    assert s["norm_ratio"] == pytest.approx(want, rel=1e-5)
    s = link("lowrank", q=16, seed=3)
    assert s["cos"] == pytest.approx(s["norm_ratio"], rel=1e-5)
    # and what it leaves besides x's direction: |d|^2 - |d|^4/|x|^2, over |x|^2
    r = s["norm_ratio"]
    assert s["rest"] == pytest.approx(r * math.sqrt(1 - r * r), rel=1e-4)
    assert s["cos"] == pytest.approx(math.sqrt(16 / 64), rel=0.1)
    s = link("int8")
    assert 0.99 < s["cos"] <= 1 + 1e-6


def test_fidelity_weighs_a_nearly_empty_message_by_what_it_carries():
    """A message whose own error is near zero can still carry earlier messages' rest
    under error feedback.  A mean of the messages' ratios counts it as much as any other:
    on FA with sign errors and error feedback, one epoch of five read 4.9 where the
    others read 1.0 (RESULTS.md, "What arrives of each message").  Pooled, such a
    message weighs what it carries."""
    ch = Channel(make_codec("fp16"), src="a", dst="b", kind="error", seed=0)
    g = torch.Generator().manual_seed(2)
    for _ in range(99):
        ch.transmit(torch.randn(64, generator=g))
    ch._measure(torch.full((64,), 1e-5), torch.full((64,), 5e-2))  # as error feedback can
    s = ch.stats(1)
    assert s["measured"] == 100
    assert s["norm_ratio"] == pytest.approx(1.0, abs=1e-3) and s["cos"] > 0.999


def test_fidelity_with_error_feedback_compares_with_the_senders_own_message():
    """With error feedback the codec sends x plus earlier messages' rest; fidelity
    compares what arrives with x alone, the error this message's sample made (top-k
    rebuilt by hand here), so a link that sends mostly others' rest shows it."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(40, generator=g) for _ in range(4)]
    ch = Channel(make_codec("topk", k=0.25, error_feedback=True), src="a", dst="b",
                 kind="error", seed=0)
    rest, dot, sent, arrived = torch.zeros(40), 0.0, 0.0, 0.0
    X, D = [], []  # every message, and its decode, as one vector each
    for x in xs:
        got = ch.transmit(x)
        fed = x + rest
        keep = fed.abs().topk(10).indices
        d = torch.zeros(40)
        d[keep] = fed[keep]
        assert torch.equal(got, d)
        rest = fed - d
        dot, sent, arrived = dot + (d @ x).item(), sent + (x @ x).item(), arrived + (d @ d).item()
        X.append(x)
        D.append(d)
    s = ch.stats(1)
    assert s["cos"] == pytest.approx(dot / math.sqrt(sent * arrived), rel=1e-5)
    assert s["norm_ratio"] == pytest.approx(math.sqrt(arrived / sent), rel=1e-5)
    # the rest: what arrived off the messages' own direction, taken as one vector
    X, D = torch.cat(X).double(), torch.cat(D).double()
    off = D - (D @ X) / (X @ X) * X
    assert s["rest"] == pytest.approx((off.norm() / X.norm()).item(), rel=1e-5)
    assert 0.3 < s["rest"] < 1  # earlier messages' rest: much of what arrives
    # the checkpoint keeps it (and one from before it was measured loads without it)
    st = ch.state_dict()
    back = Channel(make_codec("topk", k=0.25, error_feedback=True), src="a", dst="b",
                   kind="error", seed=0)
    back.load_state_dict(st)
    assert back.stats(1)["cos"] == pytest.approx(s["cos"])
    back.load_state_dict({k: v for k, v in st.items() if k != "fidelity"})
    assert back.stats(1)["measured"] == 0 and back.stats(1)["cos"] is None


def test_summary_fidelity_pools_every_message_of_a_kind():
    def row(edge, n, dot, sent, arrived):
        return {"edge": edge, "messages": n, "bytes": 4, "bandwidth_s": 0.0,
                **fidelity([n, dot, sent, arrived])}

    rows = [row("b->a", 1, 2.0, 4.0, 1.0), row("c->b", 3, 1.0, 12.0, 3.0),
            row("d->c", 0, 0.0, 0.0, 0.0)]
    assert rows[2]["cos"] is None
    s = summarize([], rows, 4, dfa=False)
    assert s["error_cos"] == pytest.approx(3.0 / math.sqrt(16.0 * 4.0))
    assert s["error_norm_ratio"] == pytest.approx(math.sqrt(4.0 / 16.0))
    assert s["error_fidelity"]["measured"] == 4 and s["activation_cos"] is None
    # a window over the messages since: 4 more on the second link, dot 2, |x|^2 4, |d|^2 1
    w = FidelityWindow(s)
    rows[1] = row("c->b", 7, 3.0, 16.0, 4.0)
    got = w.since(summarize([], rows, 8, dfa=False))
    assert {k: got[k] for k in ("error_cos", "error_norm_ratio", "error_rest")} == \
        pytest.approx({"error_cos": 1.0, "error_norm_ratio": 0.5, "error_rest": 0.0})
    # and per link: only the one that sent since, with its own messages' figures
    assert got["fidelity"] == {"error": {"c->b": pytest.approx(
        {"cos": 1.0, "norm_ratio": 0.5, "rest": 0.0})}}
    # two links sending: each its own window, and the kind's pools both
    rows[0] = row("b->a", 2, 2.0, 8.0, 2.0)  # one more: dot 0, |x|^2 4, |d|^2 1
    rows[1] = row("c->b", 9, 5.0, 20.0, 6.0)  # two more: dot 2, |x|^2 4, |d|^2 2
    got = w.since(summarize([], rows, 11, dfa=False))
    assert list(got["fidelity"]["error"]) == ["b->a", "c->b"]  # the summary's order
    # b->a: all of what arrived is off the message's direction (cos 0), |d| = |x| / 2
    assert got["fidelity"]["error"]["b->a"] == pytest.approx(
        {"cos": 0.0, "norm_ratio": 0.5, "rest": 0.5})
    assert got["fidelity"]["error"]["c->b"] == pytest.approx(
        {"cos": 2.0 / math.sqrt(8.0), "norm_ratio": math.sqrt(0.5), "rest": 0.5})
    assert got["error_cos"] == pytest.approx(2.0 / math.sqrt(8.0 * 3.0))
    assert got["error_rest"] == pytest.approx(math.sqrt(3.0 / 8.0 - (2.0 / 8.0) ** 2))
    assert w.since(summarize([], rows, 11, dfa=False)) == {}  # nothing sent since


def test_sign_bits_and_scale():
    x = torch.randn(3, 13)  # 39 entries: not a multiple of 8
    c = make_codec("sign")
    enc = c.encode(x)
    assert enc.nbytes == math.ceil(39 / 8) + 4
    d = c.decode(enc)
    assert d.shape == x.shape
    scale = x.abs().mean()
    assert torch.allclose(d, torch.where(x >= 0, scale, -scale))


def test_sign_two_scales_keep_the_sum_and_l1_norm():
    """Seide et al. 2014's 1-bit quantizer: each side of zero decodes to its own mean."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 11, generator=g).exp() - 0.8  # skewed: negatives only in (-0.8, 0)
    c = make_codec("sign", two_scales=True)
    enc = c.encode(x)
    assert enc.nbytes == math.ceil(44 / 8) + 8
    d = c.decode(enc)
    pos, neg = x[x >= 0], x[x < 0]
    assert torch.equal(d, torch.where(x >= 0, pos.mean(), neg.mean()))
    torch.testing.assert_close(d.sum(), x.sum())
    torch.testing.assert_close(d.abs().sum(), x.abs().sum())
    # the same message off the runtime's wire: the two scales travel as one part
    back = unpack(*pack(enc))
    assert torch.equal(c.decode(back), d)
    # one side empty: its magnitude is 0, not the NaN of an empty mean
    ones = make_codec("sign", two_scales=True).decode(c.encode(torch.ones(9)))
    assert torch.equal(ones, torch.ones(9))


def test_sign_of_a_softmax_error_is_the_label_alone():
    """Why DFA with `sign` errors stays at chance: e = softmax - onehot is + on every wrong
    class and - on the target, whatever the logits, so one scale decodes it as
    scale (1 - 2 onehot), a sum of (C - 2) scale per sample that never shrinks to the
    true 0; two scales keep the true sum."""
    g = torch.Generator().manual_seed(7)
    targets = torch.randint(0, 10, (32,), generator=g)
    label = torch.nn.functional.one_hot(targets, 10).float()
    for spread in (0.1, 1.0, 10.0):  # flat, plain and confident predictions
        logits = torch.randn(32, 10, generator=g) * spread
        _, _, e = loss_and_error(logits, targets, 32)
        one = make_codec("sign")
        d = one.decode(one.encode(e))
        scale = e.abs().mean()
        assert torch.equal(d, scale * (1 - 2 * label))  # the logits are gone
        torch.testing.assert_close(d.sum(1), torch.full((32,), 8 * scale.item()))
        two = make_codec("sign", two_scales=True)
        torch.testing.assert_close(two.decode(two.encode(e)).sum(), e.sum(), atol=1e-6, rtol=0)


def test_ternary_is_unbiased_keeps_zeros_and_packs_two_bits():
    """TernGrad: s · sign(x) · Bernoulli(|x| / s), s = max |x|: the mean over draws is x,
    an exact zero is never sent as anything else, and 4 entries share a byte."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, generator=g)
    x[0, :3] = 0  # a ReLU's off units
    c = make_codec("ternary")
    enc = c.encode(x, g)
    assert enc.nbytes == math.ceil(21 / 4) + 4
    s = x.abs().max()
    draws = torch.stack([c.decode(c.encode(x, g)) for _ in range(4000)])
    assert set(draws.unique().tolist()) <= {-s.item(), 0.0, s.item()}
    assert torch.equal(draws[:, 0, :3], torch.zeros(4000, 3))
    # each entry's mean over 4000 draws: within 5 standard errors of x
    sd = (x.abs() * (s - x.abs())).sqrt() / math.sqrt(4000)
    assert ((draws.mean(0) - x).abs() <= 5 * sd + 1e-6).all()
    # the largest entry is always sent; the same stream gives the same message
    assert (draws.flatten(1)[:, x.abs().argmax()] == s * x.flatten()[x.abs().argmax()].sign()).all()
    a, b = (make_codec("ternary").encode(x, torch.Generator().manual_seed(1)) for _ in "ab")
    assert torch.equal(a.payload["codes"], b.payload["codes"])
    assert torch.equal(c.decode(unpack(*pack(enc))), c.decode(enc))  # off the wire alike
    assert torch.equal(c.decode(c.encode(torch.zeros(5), g)), torch.zeros(5))


def test_lowrank_shares_only_a_seed_and_is_exact_in_span():
    sender, receiver = LowRank(q=4, seed=11), LowRank(q=4, seed=11)
    x = torch.randn(6, 2, 5, 5)
    enc = sender.encode(x)
    assert enc.payload["z"].shape == (6, 4) and enc.nbytes == 6 * 4 * 4 + 4
    assert receiver.decode(enc).shape == x.shape
    # the receiver reconstructs with its own copy of the seeded projection
    p = receiver.projection(50, enc.meta["counter"])
    assert torch.allclose(p.T @ p, torch.eye(4), atol=1e-5)
    # for inputs in the projection's span the reconstruction is exact
    x_span = (torch.randn(6, 4) @ sender.projection(50, 1).T).reshape(6, 2, 5, 5)
    enc = sender.encode(x_span)
    assert enc.meta["counter"] == 1
    assert torch.allclose(receiver.decode(enc), x_span, atol=1e-5)
    # the codec is built from (q, seed) alone: no weight ever reaches it
    assert all(not isinstance(v, torch.Tensor) for v in vars(sender).values())


def test_lowrank_unbiased_decodes_x_on_average_where_the_projection_shrinks_it():
    """Over the seeded projections E[P P^T] = (q/n) I: the plain decode's mean is (q/n) x,
    the unbiased one's (n/q times it) is x, and their mean squared errors are (1 - q/n)
    and (n/q - 1) times |x|^2 (stochastic subspace descent's scaling); same bytes."""
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))  # n = 16 a row
    plain, unbiased = LowRank(q=4, seed=5), make_codec("lowrank", seed=5, q=4, unbiased=True)
    encs = [plain.encode(x) for _ in range(3000)]
    a = torch.stack([plain.decode(e) for e in encs])
    b = torch.stack([unbiased.decode(e) for e in encs])
    torch.testing.assert_close(b, a * 4)  # n/q
    assert unbiased.encode(x).nbytes == encs[0].nbytes
    se = b.std(0) / math.sqrt(3000)
    assert ((b.mean(0) - x).abs() <= 5 * se).all()
    assert ((a.mean(0) - x / 4).abs() <= 5 * se / 4).all()
    norm2 = (x ** 2).sum(-1)
    torch.testing.assert_close(((a - x) ** 2).sum(-1).mean(0), 0.75 * norm2, rtol=0.05, atol=0)
    torch.testing.assert_close(((b - x) ** 2).sum(-1).mean(0), 3 * norm2, rtol=0.15, atol=0)


# ------------------------------------------------------------------------ channels
def test_channel_bytes_equal_encoded_sizes():
    ch = Channel(make_codec("int8"), src="a", dst="b", kind="error", seed=0)
    sizes = []
    for n in (10, 20, 30):
        x = torch.randn(n)
        sizes.append(ch.codec.encode(x, torch.Generator()).nbytes)
        ch.transmit(x)
    assert ch.bytes == sum(sizes) == sum(n + 4 for n in (10, 20, 30)) and ch.sent == 3
    # the run summary's ledger of the encoded payloads, from those counts
    s = summarize([], [{"edge": ch.edge, **ch.stats(6)}], 6, dfa=False)
    assert s["ledger"]["error"] == {"count": 3, "header_bytes": 0, "payload_bytes": ch.bytes,
                                    "bytes": ch.bytes}
    assert s["error_bytes_per_sample"] == ch.bytes / 6


def test_channel_delay_and_drop():
    ch = Channel(make_codec("fp32"), src="a", dst="b", kind="error", delay=1)
    xs = [torch.full((2,), float(i)) for i in range(4)]
    got = [ch.transmit(x) for x in xs]
    assert got[0] is None and all(torch.equal(g, x) for g, x in zip(got[1:], xs))
    # delay counts steps: with 2 messages (micro-batches) per step, 2 messages late
    ch = Channel(make_codec("fp32"), src="a", dst="b", kind="error", delay=1, slots_per_step=2)
    got = [ch.transmit(x) for x in xs]
    assert got[:2] == [None, None] and torch.equal(got[2], xs[0]) and torch.equal(got[3], xs[1])
    # drop: own seeded generator, reproducible, about p of the messages, bytes still counted
    pattern = []
    for _ in range(2):
        ch = Channel(make_codec("fp32"), src="a", dst="b", kind="error", drop=0.5, seed=7)
        pattern.append([ch.transmit(torch.ones(3)) is None for _ in range(400)])
    assert pattern[0] == pattern[1] and 150 < sum(pattern[0]) < 250
    assert ch.bytes == 400 * 12 and ch.dropped == sum(pattern[0])
    ch = Channel(make_codec("fp32"), src="a", dst="b", kind="error", drop=1.0)
    assert all(ch.transmit(torch.ones(3)) is None for _ in range(10))


def test_noise_is_an_unbiased_rest_of_its_size_per_sample_and_both_ends_agree():
    """noise r: what arrives is x plus Gaussian noise r times each sample's own size,
    for samples 10^-3 and 10^3 alike, and unbiased; so the link's rest is r and its
    cosine 1/sqrt(1 + r^2).  The receiver decodes the very noise the sender measured."""
    r = 0.7
    ch = Channel(make_codec("fp32"), src="a", dst="b", kind="error", noise=r, seed=3)
    scale = torch.logspace(-3, 3, 8).reshape(8, 1)
    rel, standard, dot = [], [], 0.0
    for _ in range(50):
        x = torch.randn(8, 256, dtype=torch.float64).float() * scale
        d = ch.transmit(x)
        rel.append((d - x).norm(dim=1) / x.norm(dim=1))
        standard.append((d - x) / (r * x.pow(2).mean(1, keepdim=True).sqrt()))
        dot += float((d.double() * x.double()).sum())
    per_sample = torch.stack(rel).mean(0)  # each sample scale's noise over its own size
    assert torch.allclose(per_sample, torch.full((8,), r), rtol=0.02), per_sample
    z = torch.stack(standard)
    assert abs(float(z.mean())) < 0.03 and float(z.std()) == pytest.approx(1.0, abs=0.02)
    st = ch.stats(8)
    assert st["noise"] == r and st["bytes"] == 50 * 8 * 256 * 4  # no byte for the noise
    assert st["rest"] == pytest.approx(r, rel=0.03)
    assert st["cos"] == pytest.approx(1 / math.sqrt(1 + r * r), rel=0.01)
    assert ch.fidelity_sums()[1] == pytest.approx(dot, rel=1e-5)  # the receiver's own d
    # on a lossy codec the noise is sized to the decode, and adds to the codec's rest
    plain = Channel(make_codec("sign"), src="a", dst="b", kind="error", seed=3)
    noisy = Channel(make_codec("sign"), src="a", dst="b", kind="error", seed=3, noise=0.5)
    x = torch.randn(64, 512)
    a, b = plain.transmit(x), noisy.transmit(x)
    assert float(((b - a).norm(dim=1) / a.norm(dim=1)).mean()) == pytest.approx(0.5, rel=0.03)
    # orthogonal to x and to the codec's own rest: the squares add, the noise's at 0.5
    # of the decode's size (sign's norm ratio, sqrt(2/pi) here)
    p, n = plain.stats(64), noisy.stats(64)
    assert n["rest"] == pytest.approx(math.hypot(p["rest"], 0.5 * p["norm_ratio"]), rel=0.02)
    assert n["cos"] * n["norm_ratio"] == pytest.approx(p["cos"] * p["norm_ratio"], rel=0.01)
    # the seed travels with the message, so a queued (delayed) message keeps its noise
    enc, _ = noisy.encode(x)
    back = unpack(*pack(enc))
    assert back.noise == enc.noise and enc.noise[1] == 0.5
    payload, meta = pack(enc)
    for bad in ([1], [-1, 0.5], [1, -0.5], [1, float("nan")], "x"):
        with pytest.raises(ValueError, match="noise"):
            unpack(payload, {**meta, "nz": bad})


def test_joined_errors_wait_for_every_part_of_the_same_forward():
    """Two links, the second a forward behind: each forward's parts join in order, a lost
    part counts as zero, all lost is LOST, and the parts held survive a state round trip."""
    from localnet.channels.channel import DATA, LOST, WAIT, JoinedErrors

    j = JoinedErrors(2)
    one, two = torch.ones(2), torch.full((2,), 2.0)
    j.arrive(0, DATA, one)   # forward 0's first part
    j.arrive(1, WAIT, None)  # the second link has nothing yet
    assert j.take() == (WAIT, []) and (j.ahead(0), j.ahead(1)) == (1, 0)
    j.arrive(0, LOST, None)  # forward 1's first part was lost
    j.arrive(1, DATA, two)   # forward 0's second part
    state, got = j.take()
    assert state == DATA and [g.tolist() for g in got] == [[1, 1], [2, 2]]
    again = JoinedErrors(2)
    again.load_state_dict(j.state_dict())  # forward 1's lost part is still held
    again.arrive(0, WAIT, None)
    again.arrive(1, DATA, two)
    assert again.take() == (DATA, [two])
    j.arrive(0, WAIT, None)
    j.arrive(1, LOST, None)
    assert j.take() == (LOST, []) and not j
    with pytest.raises(ValueError, match="2 links saved, 3 here"):
        JoinedErrors(3).load_state_dict(j.state_dict())


def test_bandwidth_is_accounted():
    ch = Channel(make_codec("fp16"), src="a", dst="b", kind="activation", bandwidth=1000.0)
    for _ in range(5):
        ch.transmit(torch.ones(100))
    assert ch.bytes == 1000 and ch.stats(10)["bandwidth_s"] == pytest.approx(1.0)
    assert ch.stats(10)["bytes_per_sample"] == 100


# --------------------------------------------------------------------- integration
def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _train(cfg, steps=4):
    data, _, model, ex = build(cfg)
    for x, y in batches(data, steps):
        ex.train_step(x, y, cfg.train.lr, cfg.train.weight_decay)
    return model, ex


def test_default_channel_config_builds_no_channels():
    cfg = small()
    assert not cfg.channel.active()
    _, _, _, ex = build(cfg)
    assert ex.channels is None and ex.channel_summary() is None and len(ex.stages) == 1


@pytest.mark.parametrize("extra", [["rule.name=fa"], ["rule.name=dfa"],
                                   ["rule.name=kp", "train.micro_batches=2"]])
def test_fp32_channels_are_bit_identical_to_no_channels(extra):
    plain, _ = _train(small(*extra))
    chan, ex = _train(small(*extra, "channel.enabled=true"))
    assert len(ex.stages) == 3 and ex.channels is not None
    a, b = plain.state_dict(), chan.state_dict()
    tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
    assert a.keys() == b.keys() and tensors
    assert all(torch.equal(a[k], b[k]) for k in tensors)
    s = ex.channel_summary()
    # fp32 errors: 4 bytes per entry of each 16-wide hidden activation, 2 edges
    assert s["error_bytes_per_sample"] == (2 * 16 * 4 if extra[0] != "rule.name=dfa" else 2 * 10 * 4)
    assert s["error_bits_per_sample"] == 8 * s["error_bytes_per_sample"]


def test_executor_bytes_equal_encoded_sizes():
    model, ex = _train(small("channel.error.codec=int8", "channel.activation.codec=sign"), steps=3)
    s = ex.channel_summary()
    assert s["samples"] == 3 * 32
    for edge in s["error"].values():
        assert edge["messages"] == 3 and edge["bytes"] == 3 * (32 * 16 + 4)
    for edge in s["activation"].values():
        assert edge["bytes"] == 3 * (math.ceil(32 * 16 / 8) + 4)
    assert s["ledger"]["total_bytes"] == s["error_bytes"] + s["activation_bytes"]
    assert s["ledger"]["error"]["payload_bytes"] == s["error_bytes"]


def test_delay_one_uses_the_error_of_the_previous_step():
    cfg = small("channel.error.delay=1", "model.widths=[16]")
    data, _, model, ex = build(cfg)
    sent, received = [], []
    bottom, top = ex.stages
    top_bw, bottom_bw = top.backward, bottom.backward
    top.backward = lambda g, mb=0, e=None: sent.append((mb, top_bw(g, mb, e)[0])) or [sent[-1][1]]
    bottom.backward = lambda g, mb=0, e=None: received.append((mb, g.clone())) or bottom_bw(g, mb, e)
    w0 = _params(bottom.module)
    for t, (x, y) in enumerate(batches(data, 4)):
        ex.train_step(x, y, cfg.train.lr, 0.0)
        if t == 0:  # nothing has arrived yet: no backward, no update below the edge
            assert received == [] and all(torch.equal(v, w0[k]) for k, v in
                                          _params(bottom.module).items())
    assert len(sent) == 4 and len(received) == 3
    for t in range(1, 4):  # step t ran on the error sent at step t-1, with its forward
        (mb, g), (mb_sent, g_sent) = received[t - 1], sent[t - 1]
        assert mb == mb_sent and torch.equal(g, g_sent)


def test_delayed_error_updates_with_the_input_it_belongs_to():
    # stale errors, as in delayed-gradient training: the bottom layer pairs the error of
    # step t-1 with its own stored input of step t-1 (and the weights that forward used).
    # FA (fixed B), plain SGD: after step 2 of the delayed run the bottom layer equals the
    # undelayed run's after step 1; pairing with the current batch's input would not.
    base = ["model.widths=[16]", "train.momentum=0", "train.weight_decay=0"]
    d0, _, m0, ex0 = build(small(*base, "channel.enabled=true"))
    d1, _, m1, ex1 = build(small(*base, "channel.error.delay=1"))
    b = batches(d0, 2)
    init = _params(ex1.stages[0].module)
    ex0.train_step(*b[0], 0.05, 0.0)
    for x, y in b:
        ex1.train_step(x, y, 0.05, 0.0)
    want, got = _params(ex0.stages[0].module), _params(ex1.stages[0].module)
    assert all(torch.allclose(got[k], want[k], atol=1e-7) for k in want)
    assert any(not torch.equal(got[k], init[k]) for k in init)  # it did learn


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_drop_everything_freezes_the_weights_below_that_edge(rule):
    # 3 units fc1, fc2, head; drop every error crossing boundary 2 (fc2 <-> head)
    cfg = small(f"rule.name={rule}", "train.momentum=0.9",
                "channel.edges={2: {error: {drop: 1.0}}}")
    data, _, model, ex = build(cfg)
    before = [_params(s.module) for s in ex.stages]
    for x, y in batches(data, 4):
        ex.train_step(x, y, cfg.train.lr, cfg.train.weight_decay)
    after = [_params(s.module) for s in ex.stages]
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(before, after)]
    if rule == "fa":   # fc1 and fc2 are below the dead edge
        assert changed == [False, False, True]
    else:              # DFA: only fc2's broadcast copy of e is lost; fc1 still learns
        assert changed == [True, False, True]
    s = ex.channel_summary()
    dead = [v for v in s["error"].values() if v["drop"] == 1.0]
    assert len(dead) == 1 and dead[0]["delivered"] == 0 and dead[0]["dropped"] == 4


def test_edge_overrides_by_name_and_config_validation():
    cfg = small("channel.edges={fc1->fc2: {error: {codec: sign}}, 2: {activation: {codec: fp16}}}")
    _, _, _, ex = build(cfg)
    ch = ex.channels
    assert [c.codec.name for c in ch.errors] == ["sign", "fp32"]
    assert [c.codec.name for c in ch.activations] == ["fp32", "fp16"]
    assert [c.edge for c in ch.errors] == ["fc2->fc1", "head->fc2"]
    for bad, named in [("channel.error.codec=float8", "codec"),
                       ("channel.edges={1: {error: {drop: 2}}}", "edges.1.error"),
                       ("channel.activation.delay=1", "activation"),
                       ("channel.activation.noise=0.1", "activation"),
                       ("channel.edges={fc1->fc2: {activation: {noise: 0.1}}}",
                        "edges.fc1->fc2.activation"),
                       ("channel.error.noise=-1", "channel.error.noise")]:
        with pytest.raises(ConfigError, match=named):
            small(bad)
    # in-process, the stages are cut where runtime.partition cuts the actors
    from localnet.runtime.ray_executor import RayExecutor
    two = small("channel.error.codec=sign", "runtime.partition={stages: 2}")
    data, _, _, ex = build(two)
    actors = RayExecutor(two, data.input_shape, data.num_classes, local=True)
    assert len(ex.stages) == 2 == actors.num_stages
    assert [c.edge for c in ex.channels.errors] == list(actors.channel_summary()["error"])
    # a key that names no edge of this run would change nothing: it is an error
    for key in ("fc1->head", "3"):
        with pytest.raises(ConfigError, match=f"channel.edges.{key}: no edge.*fc1->fc2"):
            build(small(f"channel.edges={{{key}: {{error: {{codec: sign}}}}}}"))


def test_train_summary_has_channels(tmp_path):
    from localnet.train import train
    s = train(small("channel.error.codec=topk", "channel.error.k=0.25", "train.max_steps=3"),
              tmp_path, progress=False)
    ch = s["channels"]
    assert ch["error"]["fc2->fc1"]["codec"] == "topk"
    # 16 entries per sample, 25%: 32*16*0.25 values of 4 bytes + 1-byte indices (n = 512 -> 2)
    assert ch["error"]["fc2->fc1"]["bytes"] == 3 * 128 * (4 + 2)


# ------------------------------------------------------------------ on the runtime's actors
RUNTIME_LINKS = [
    # (rule, schedule, channel settings): every codec path, drops, delays, per-edge overrides
    ("fa", "gpipe", ["channel.error.codec=int8", "channel.error.drop=0.3",
                     "channel.activation.codec=fp16"]),
    ("kp", "1f1b", ["channel.error.codec=topk", "channel.error.k=0.25",
                    "channel.error.error_feedback=true", "channel.error.delay=1",
                    "channel.error.noise=0.5"]),
    ("dfa", "gpipe", ["channel.error.codec=sign", "channel.error.two_scales=true",
                      "channel.error.drop=0.5", "channel.activation.codec=ternary",
                      "channel.edges={1: {error: {codec: lowrank, q: 3}}}"]),
    ("pfa", "async", ["channel.error.codec=bf16", "channel.activation.codec=int8"]),
]


def _runtime_pair(rule, schedule, links, M=2):
    from localnet.runtime.ray_executor import RayExecutor

    sets = [f"rule.name={rule}", "train.momentum=0.9", f"train.micro_batches={M}", *links]
    cfg = small(*sets)
    data, _, model, ref = build(cfg)   # in-process, one stage per unit
    rcfg = small(*sets, "runtime.executor=local", f"runtime.schedule={schedule}")
    ex = RayExecutor(rcfg, data.input_shape, data.num_classes, local=True)
    return cfg, data, model, ref, ex


@pytest.mark.parametrize("rule, schedule, links", RUNTIME_LINKS[:3])
def test_runtime_actors_apply_channels_exactly_as_inprocess(rule, schedule, links):
    # the actors split every channel at send / receive (codec state and drops on the
    # sender, decode and the delay FIFO on the receiver); same edges and seeds as
    # in-process, so after several steps every weight and every count must agree
    cfg, data, model, ref, ex = _runtime_pair(rule, schedule, links)
    for x, y in batches(data, 6):
        a = ref.train_step(x, y, cfg.train.lr, cfg.train.weight_decay)
        b = ex.train_step(x, y, cfg.train.lr, cfg.train.weight_decay)
        assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-5, abs=1e-6)
    from localnet.runtime.testing import state_diff
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
    assert worst < 1e-5 and not rng
    want, got = ref.channel_summary(), ex.channel_summary()
    for kind in ("activation", "error"):
        assert got[kind].keys() == want[kind].keys()
        for edge, w in want[kind].items():
            g = got[kind][edge]
            for k in ("codec", "messages", "delivered", "dropped", "not_yet_arrived", "bytes",
                      "measured"):
                assert g[k] == w[k], (kind, edge, k)
            assert g["cos"] == pytest.approx(w["cos"]) and g["cos"] is not None
    assert got["error_bits_per_sample"] == pytest.approx(want["error_bits_per_sample"])
    if any("drop" in s for s in links):
        assert sum(v["dropped"] for v in got["error"].values()) > 0  # the test bites
    ex.close()


def test_runtime_ledger_counts_the_encoded_bytes_and_async_runs():
    # int8 activations: 1 byte per entry + a 4-byte scale on the wire; the worker ledger
    # (what the run summary's `messages` reports) counts exactly that as payload
    cfg, data, _, _, ex = _runtime_pair(*RUNTIME_LINKS[3])
    steps = 3
    for x, y in batches(data, steps):
        ex.train_step(x, y, cfg.train.lr, cfg.train.weight_decay)
    ex.flush()
    s = ex.channel_summary()
    # 32 samples x 16 features per boundary (fc1->fc2, fc2->head), 2 micro-batches
    for edge in ("fc1->fc2", "fc2->head"):
        assert s["activation"][edge]["bytes"] == steps * 2 * (16 * 16 + 4)
        assert s["error"][edge.split("->")[1] + "->" + edge.split("->")[0]]["bytes"] == \
            steps * 2 * 16 * 16 * 2  # bf16
    act = ex.ledger_summary()["activation"]
    driver_inputs = steps * 32 * 3 * 32 * 32 * 4  # fp32 images from the driver, unrestricted
    assert act["payload_bytes"] == driver_inputs + 2 * steps * 2 * (16 * 16 + 4)
    ex.close()
