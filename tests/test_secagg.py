"""Secure aggregation core: the field and its quantization error, Shamir
shares, the mask PRG, and the whole protocol simulated in one process:
masks cancel, dropouts below the threshold are recovered from the shares,
a client never reveals both secrets of another, and the securely
aggregated mean equals plain FedAvg of the same updates within the
quantization error."""
from __future__ import annotations

import numpy as np
import pytest

from flcommon.secagg import (P, FieldError, ProtocolError, ShareError, advertise, decode_mean,
                             default_threshold, encode_update, error_bound, mask, share_keys, unmask,
                             unmasked_sum)
from flcommon.secagg import field, keys, prg, shamir
from reference_fedavg import fedavg

CONTEXT = b"session-1/3"
SHAPES = [(6, 4), (4,), (3, 2)]
REF = [(s, np.dtype(np.float32)) for s in SHAPES]


def secret_of(client: str) -> bytes:
    return (client * 8).encode()[:16].ljust(16, b"#")


# ---------------------------------------------------------------- field and quantization

def test_quantization_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 10_000)
    q, clipped = field.quantize(x, scale=1000.0, max_clients=10)
    assert clipped == 0 and q.dtype == np.uint64 and int(q.max()) < P
    assert np.abs(field.dequantize(q, 1000.0) - x).max() <= 0.5 / 1000 + 1e-12


def test_field_sum_decodes_negative_totals_and_never_wraps_within_the_bound():
    bound = field.value_bound(4)
    q, _ = field.quantize(np.full(3, -float(bound)), scale=1.0, max_clients=4)
    total = q
    for _ in range(3):
        total = field.add(total, q)
    assert list(field.dequantize(total, 1.0)) == [-4.0 * bound] * 3
    # beyond the bound values are clipped (and counted), never wrapped
    q, clipped = field.quantize(np.array([bound * 3.0, -bound * 3.0, 1.0]), scale=1.0, max_clients=4)
    assert clipped == 2
    assert list(field.dequantize(q, 1.0)) == [bound, -bound, 1.0]


def test_field_refuses_foreign_vectors():
    with pytest.raises(FieldError):
        field.check(np.array([P], dtype=np.uint64))
    with pytest.raises(FieldError):
        field.check(np.zeros(3, dtype=np.int64))
    with pytest.raises(FieldError):
        field.quantize(np.array([np.nan]), 1.0, 2)


def test_prg_masks_are_field_elements_and_sub_undoes_add():
    a = prg.mask(b"a" * 32, 1000)
    b = prg.mask(b"b" * 32, 1000)
    assert np.array_equal(field.sub(field.add(a, b), b), a)
    assert (a < P).all() and not np.array_equal(a, b)
    # uniform-looking: mean close to P/2 (std of the mean of 1000 uniforms is P/110)
    assert abs(float(a.astype(np.float64).mean()) / P - 0.5) < 0.05
    assert np.array_equal(prg.mask(b"a" * 32, 1000), a)  # same seed, same mask


# ---------------------------------------------------------------- Shamir

def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not():
    rng = np.random.default_rng(2)
    secret = bytes(rng.integers(0, 256, 32, dtype=np.uint8))
    coeff = lambda k: int(rng.integers(1, 2**62)) ** 9  # noqa: E731 (large, arbitrary coefficients)
    shares = shamir.split(secret, n=7, threshold=4, coefficient=coeff)
    for pick in ([0, 1, 2, 3], [6, 4, 2, 0], [1, 3, 5, 6]):
        assert shamir.combine([shares[i] for i in pick], 4) == secret
    with pytest.raises(ShareError, match="4 needed"):
        shamir.combine(shares[:3], 4)
    with pytest.raises(ShareError, match="4 needed"):
        shamir.combine([shares[0]] * 4, 4)  # the same share four times is one share
    # three shares and a wrong fourth do not give the secret
    wrong = shares[:3] + [(shares[3][0], (shares[3][1] + 1) % shamir.PRIME)]
    try:
        assert shamir.combine(wrong, 4) != secret
    except ShareError:
        pass


# ---------------------------------------------------------------- keys

def test_key_agreement_is_symmetric_and_ciphertexts_are_bound_to_their_context():
    a = keys.private_key(b"\x01" * 32)
    b = keys.private_key(b"\x02" * 32)
    k_ab = keys.agree(a, keys.public_bytes(b), b"info")
    assert k_ab == keys.agree(b, keys.public_bytes(a), b"info")
    assert k_ab != keys.agree(a, keys.public_bytes(b), b"other info")
    ct = keys.encrypt(k_ab, b"\0" * 12, b"share", b"r1|a->b")
    assert keys.decrypt(k_ab, ct, b"r1|a->b") == b"share"
    with pytest.raises(keys.CryptoError):
        keys.decrypt(k_ab, ct, b"r2|a->b")  # replayed into another round
    with pytest.raises(keys.CryptoError):
        keys.decrypt(k_ab, ct[:-1] + bytes([ct[-1] ^ 1]), b"r1|a->b")
    with pytest.raises(keys.CryptoError, match="at least 16"):
        keys.client_material(b"short", CONTEXT, "c", "x")


# ---------------------------------------------------------------- the protocol

def run_protocol(vectors: dict[str, np.ndarray], threshold: int, never_share=(), drop_before_mask=(),
                 silent_at_unmask=(), neighbours=None, graph_unknown_at_unmask=False):
    """The four stages over in-memory relays (what the store carries).
    never_share: advertise, then vanish; drop_before_mask: share, then
    vanish (the masks they agreed must be removed); silent_at_unmask: send
    a masked vector but no shares. graph_unknown_at_unmask: the clients
    reveal as if every pair were neighbours (only the aggregator checks)."""
    clients = sorted(vectors)
    roster = {c: advertise(secret_of(c), CONTEXT, c) for c in clients}
    sent = {c: share_keys(secret_of(c), CONTEXT, c, roster, threshold, neighbours)
            for c in clients if c not in never_share}
    shared = {c: roster[c] for c in sent}
    masked = {c: mask(secret_of(c), CONTEXT, c, vectors[c], shared, threshold, neighbours)
              for c in shared if c not in drop_before_mask}
    revealed = {}
    for c in masked:
        if c in silent_at_unmask:
            continue
        inbox = {sender: out[c] for sender, out in sent.items() if c in out}
        revealed[c] = unmask(secret_of(c), CONTEXT, c, roster, inbox, shared, masked, threshold,
                             None if graph_unknown_at_unmask else neighbours)
    total = unmasked_sum(CONTEXT, roster, shared, masked, revealed, threshold, neighbours)
    return total, masked, revealed, sent


def quantized_vectors(n: int, length: int = 50, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"client-{i}": field.quantize(rng.normal(0, 1, length), 1e6, n)[0] for i in range(n)}


def field_sum(vectors):
    vs = list(vectors)
    total = vs[0].copy()
    for v in vs[1:]:
        total = field.add(total, v)
    return total


def test_masks_cancel_without_dropouts():
    vectors = quantized_vectors(5)
    total, masked, _, _ = run_protocol(vectors, threshold=3)
    assert np.array_equal(total, field_sum(vectors.values()))
    # The server only ever holds masked vectors: none equals its update, and
    # each looks uniform over the field, not like small quantized values.
    for c, m in masked.items():
        assert not np.array_equal(m, vectors[c])
        assert np.abs(field.dequantize(m, 1e6)).mean() > P / 8 / 1e6


@pytest.mark.parametrize("case", ["never_share", "drop_before_mask", "silent_at_unmask", "mixed"])
def test_dropouts_below_the_threshold_are_recovered(case):
    vectors = quantized_vectors(7)
    ids = sorted(vectors)
    kw = {"never_share": {"never_share": {ids[0], ids[4]}},
          "drop_before_mask": {"drop_before_mask": {ids[1], ids[6]}},
          "silent_at_unmask": {"silent_at_unmask": {ids[2], ids[3]}},
          "mixed": {"never_share": {ids[0]}, "drop_before_mask": {ids[5]}, "silent_at_unmask": {ids[6]}}}[case]
    total, masked, revealed, _ = run_protocol(vectors, threshold=4, **kw)
    assert np.array_equal(total, field_sum(vectors[c] for c in masked))
    assert len(revealed) < 7  # somebody dropped at some stage


def test_too_many_dropouts_fail_instead_of_revealing():
    vectors = quantized_vectors(5)
    ids = sorted(vectors)
    with pytest.raises(ProtocolError, match="threshold"):
        run_protocol(vectors, threshold=3, drop_before_mask={ids[0], ids[1], ids[2]})
    with pytest.raises(ProtocolError, match="revealed"):
        run_protocol(vectors, threshold=3, silent_at_unmask={ids[0], ids[1], ids[2]})


def test_a_client_never_reveals_both_secrets_of_another():
    vectors = quantized_vectors(5)
    ids = sorted(vectors)
    _, masked, revealed, _ = run_protocol(vectors, threshold=3, drop_before_mask={ids[2]})
    for shares in revealed.values():
        assert set(shares["b"]) == set(masked)
        assert set(shares["s"]) == {ids[2]}
        assert not set(shares["b"]) & set(shares["s"])
    # Asked to treat a client as both survivor and dropout, or to reveal for
    # survivors that never shared, it refuses.
    roster = {c: advertise(secret_of(c), CONTEXT, c) for c in ids}
    with pytest.raises(ProtocolError):
        unmask(secret_of(ids[0]), CONTEXT, ids[0], roster, {}, shared=ids[:3], survivors=ids, threshold=3)
    with pytest.raises(ProtocolError, match="reveals nothing"):
        unmask(secret_of(ids[0]), CONTEXT, ids[0], roster, {}, shared=ids, survivors=ids[1:], threshold=3)


def test_stages_are_deterministic_so_a_retry_sends_the_same():
    ids = ["a", "b", "c"]
    roster = {c: advertise(secret_of(c), CONTEXT, c) for c in ids}
    assert roster["a"] == advertise(secret_of("a"), CONTEXT, "a")
    assert share_keys(secret_of("a"), CONTEXT, "a", roster, 2) == share_keys(secret_of("a"), CONTEXT, "a", roster, 2)
    # another round, other keys
    assert advertise(secret_of("a"), b"session-1/4", "a") != roster["a"]


def test_a_roster_without_the_clients_own_keys_is_refused():
    ids = ["a", "b", "c"]
    roster = {c: advertise(secret_of(c), CONTEXT, c) for c in ids}
    roster["a"] = roster["b"]
    with pytest.raises(ProtocolError, match="a's keys"):
        share_keys(secret_of("a"), CONTEXT, "a", roster, 2)


def test_wrong_shares_of_a_dropped_key_are_detected():
    vectors = quantized_vectors(4)
    ids = sorted(vectors)
    roster = {c: advertise(secret_of(c), CONTEXT, c) for c in ids}
    sent = {c: share_keys(secret_of(c), CONTEXT, c, roster, 3) for c in ids}
    masked = {c: mask(secret_of(c), CONTEXT, c, vectors[c], roster, 3) for c in ids[1:]}
    revealed = {c: unmask(secret_of(c), CONTEXT, c, roster, {s: o[c] for s, o in sent.items()}, ids, masked, 3)
                for c in masked}
    bad = ids[1]
    y = shamir.y_from_bytes(revealed[bad]["s"][ids[0]])
    revealed[bad]["s"][ids[0]] = shamir.y_to_bytes((y + 1) % shamir.PRIME)
    with pytest.raises((ProtocolError, ShareError)):
        unmasked_sum(CONTEXT, roster, ids, masked, revealed, 3)


# ---------------------------------------------------------------- secure FedAvg = FedAvg

@pytest.mark.parametrize("dropouts", [0, 2])
def test_secure_fedavg_equals_plain_fedavg_within_the_quantization_error(dropouts):
    rng = np.random.default_rng(9)
    n = 6
    ids = [f"c{i}" for i in range(n)]
    global_weights = [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]
    weights = {c: [g + rng.normal(0, 0.05, g.shape).astype(np.float32) for g in global_weights] for c in ids}
    examples = {c: int(rng.integers(20, 200)) for c in ids}
    vectors, clipped = {}, 0
    for c in ids:
        delta = [w - g for w, g in zip(weights[c], global_weights)]
        vectors[c], k = encode_update(delta, examples[c], max_clients=n)
        clipped += k
    assert clipped == 0
    dropped = set(ids[:dropouts])
    total, masked, _, _ = run_protocol(vectors, threshold=default_threshold(n), drop_before_mask=dropped)
    survivors = sorted(masked)
    n_total = sum(examples[c] for c in survivors)
    mean_delta = decode_mean(total, n_total, REF)
    secure = [g + d for g, d in zip(global_weights, mean_delta)]
    plain = fedavg([(weights[c], examples[c]) for c in survivors], REF)
    bound = error_bound(len(survivors), n_total)
    for s, p in zip(secure, plain):
        # quantization bound, plus float32 rounding of weights of magnitude ~3
        assert np.abs(s.astype(np.float64) - p.astype(np.float64)).max() <= bound + 4e-7
    assert bound < 1e-6


# ---------------------------------------------------------------- SecAgg+: the sparse neighbour graph

def test_the_neighbour_graph_is_k_regular_symmetric_and_the_same_for_every_party():
    from flcommon.secagg import graph
    clients = [f"client_{i}" for i in range(20)]
    g = graph.neighbours(CONTEXT, clients, 6)
    assert set(g) == set(clients)
    assert all(len(ns) == 6 and c not in ns for c, ns in g.items())
    assert all(c in g[other] for c, ns in g.items() for other in ns)
    assert graph.neighbours(CONTEXT, list(reversed(clients)), 6) == g     # the order given does not matter
    assert graph.neighbours(b"session-1/4", clients, 6) != g              # each round draws its own
    assert graph.degree(5, 20) == 6                                        # odd k is rounded up
    assert graph.degree("log", 100) == 14 and graph.degree("log", 1000) == 20
    assert graph.neighbours(CONTEXT, clients[:7], 6) is None               # k >= n - 1: every pair
    assert graph.neighbourhood_size(6, 20) == 7 and graph.neighbourhood_size(None, 20) == 20


@pytest.mark.parametrize("case", ["none", "drop_before_mask", "silent_at_unmask", "mixed"])
def test_secagg_plus_masks_cancel_and_dropouts_are_recovered_among_neighbours(case):
    from flcommon.secagg import graph
    vectors = quantized_vectors(16)
    ids = sorted(vectors)
    g = graph.neighbours(CONTEXT, ids, 6)
    t = default_threshold(7)   # among a client and its 6 neighbours
    kw = {"none": {}, "drop_before_mask": {"drop_before_mask": {ids[1]}},
          "silent_at_unmask": {"silent_at_unmask": {ids[2], ids[9]}},
          "mixed": {"never_share": {ids[0]}, "drop_before_mask": {ids[5]}, "silent_at_unmask": {ids[11]}}}[case]
    total, masked, revealed, sent = run_protocol(vectors, threshold=t, neighbours=g, **kw)
    assert np.array_equal(total, field_sum(vectors[c] for c in masked))
    # Each client sent shares to its neighbours and itself only, and nobody revealed a share it does not hold.
    assert all(set(out) == set(g[c]) | {c} for c, out in sent.items())
    for responder, shares in revealed.items():
        assert set(shares["b"]) | set(shares["s"]) <= set(g[responder]) | {responder}


def test_secagg_plus_refuses_a_neighbourhood_below_its_threshold():
    from flcommon.secagg import graph
    vectors = quantized_vectors(16)
    ids = sorted(vectors)
    g = graph.neighbours(CONTEXT, ids, 4)
    victim = ids[3]
    silent = set(sorted(g[victim])[:3])   # 3 of its 4 neighbours send a masked vector, then no shares
    with pytest.raises(ProtocolError, match=f"of {victim}'s b revealed, 3 needed"):
        run_protocol(vectors, threshold=default_threshold(5), neighbours=g, silent_at_unmask=silent)


def test_survivors_split_by_dropouts_reveal_nothing_and_the_aggregator_unmasks_nothing():
    """With k = 2 (a ring), three dropouts leave three arcs with no edge
    between them: each arc's pairwise masks cancel on their own, so
    unmasking would give the server each arc's sum (two clients' updates)."""
    from flcommon.secagg import graph
    vectors = quantized_vectors(10)
    ids = sorted(vectors)
    g = graph.neighbours(CONTEXT, ids, 2)
    ring = [ids[0]]
    while len(ring) < len(ids):
        ring.append(next(c for c in sorted(g[ring[-1]]) if c not in ring))
    dropped = {ring[0], ring[3], ring[6]}
    survivors = [c for c in ids if c not in dropped]
    assert [len(p) for p in graph.parts(g, survivors)] == [3, 2, 2]
    assert graph.parts(g, ids) == [ids] and graph.parts(None, survivors) == [survivors]
    t = default_threshold(3)
    with pytest.raises(ProtocolError, match="3 unconnected parts"):
        run_protocol(vectors, threshold=t, neighbours=g, drop_before_mask=dropped)
    with pytest.raises(ProtocolError, match="3 unconnected parts"):
        run_protocol(vectors, threshold=t, neighbours=g, drop_before_mask=dropped, graph_unknown_at_unmask=True)
    # one dropout leaves the ring one arc: the round is unmasked as before
    total, masked, _, _ = run_protocol(vectors, threshold=t, neighbours=g, drop_before_mask={ring[0]})
    assert np.array_equal(total, field_sum(vectors[c] for c in masked))
