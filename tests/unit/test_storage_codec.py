"""The pure storage codec: round trips, erasure thresholds, Merkle pinpointing, keys, caps,
manifests. No sockets, no files."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.codec import pack, unpack
from threebot.storage import codec as c
from threebot.storage.errors import (
    AuthenticationFailed,
    BadCapability,
    BadManifest,
    BadParameters,
    CorruptRecord,
    NotEnoughShards,
)

K, N = c.DEFAULT_K, c.DEFAULT_N


def key_from(seed: int) -> bytes:
    return hashlib.blake2b(seed.to_bytes(8, "big"), digest_size=32).digest()


@dataclass
class Stored:
    """An object encoded into shards and hash pages, as the nodes would hold them."""

    params: c.Params
    size: int
    shards: list[bytearray]  # shard i = block i of every segment
    pages: dict[tuple[int, int], bytes]  # (shard, page) -> page record
    roots: tuple[tuple[bytes, ...], ...]


def store(data: bytes, keys: c.ObjectKeys, params: c.Params) -> Stored:
    size = len(data)
    count = params.segment_count(size)
    cipher = c.SegmentCipher(keys.require_data_key(), count)
    coder = c.ErasureCoder(params.k, params.n)
    hasher = c.ShardHasher(params, size)
    shards = [bytearray() for _ in range(params.n)]
    pages: dict[tuple[int, int], bytes] = {}
    for s in range(count):
        off, length = params.segment_span(size, s)
        seg = c.encode_segment(cipher, coder, s, data[off:off + length])
        for i, block in enumerate(seg.blocks):
            shards[i] += block
        for rec in hasher.add(seg):
            pages[(rec.shard, rec.page)] = rec.data
    assert all(len(sh) == params.shard_bytes(size) for sh in shards)
    return Stored(params, size, shards, pages, hasher.page_roots())


def read_blocks(st_: Stored, shard: int, step: int = 7, first: int = 0, stop: int | None = None) -> dict[int, bytes]:
    """Segment -> verified block of one shard, fetched ``step`` bytes at a time through the
    sans-IO reader (raises CorruptRecord like a reader would)."""
    p, size = st_.params, st_.size
    reader = c.BlockReader(p, size, shard, first, stop)
    blocks: dict[int, bytes] = {}
    while not reader.done:
        page = reader.page_needed()
        if page is not None:
            reader.add_page(page, c.open_page(st_.pages[(shard, page)], p, size, shard, page,
                                              st_.roots[shard][page]))
            blocks.update(reader.feed(b""))
            continue
        rng = reader.next_range(step)
        assert rng is not None
        off, length = rng
        blocks.update(reader.feed(bytes(st_.shards[shard][off:off + length])))
    return blocks


def fetch(st_: Stored, keys: c.ObjectKeys, shards: list[int]) -> bytes:
    p, size = st_.params, st_.size
    per_shard = {i: read_blocks(st_, i) for i in shards}
    count = p.segment_count(size)
    cipher = c.SegmentCipher(keys.require_data_key(), count)
    coder = c.ErasureCoder(p.k, p.n)
    out = bytearray()
    for s in range(count):
        out += c.decode_segment(cipher, coder, p, size, s, {i: b[s] for i, b in per_shard.items()})
    return bytes(out)


params_st = st.builds(
    c.Params,
    segment_size=st.sampled_from([1, 7, 16, 64, 100, 1000]),
    leaves_per_page=st.integers(1, 6),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(st.just(b""), st.binary(max_size=3000)),
    params=params_st,
    seed=st.integers(0, 2**32 - 1),
    survivors=st.integers(K, N),
)
def test_round_trip_any_k_shards(data: bytes, params: c.Params, seed: int, survivors: int) -> None:
    rng = random.Random(seed)
    keys = c.ReadCap(1, key_from(seed)).keys()
    stored = store(data, keys, params)
    shards = rng.sample(range(N), survivors)
    assert fetch(stored, keys, shards) == data


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=600), segment_size=st.sampled_from([1, 16, 64, 257]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_fifteen_shards_fail_cleanly(data: bytes, segment_size: int, seed: int) -> None:
    keys = c.ReadCap(1, key_from(seed)).keys()
    stored = store(data, keys, c.Params(segment_size=segment_size))
    shards = random.Random(seed).sample(range(N), K - 1)
    with pytest.raises(NotEnoughShards, match="only 15 of the 16 shards needed") as info:
        fetch(stored, keys, shards)
    assert (info.value.needed, info.value.reachable) == (16, 15)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 64 * 5, 64 * 5 + 1])
def test_sizes_around_segment_boundaries(size: int) -> None:
    data = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    params = c.Params(segment_size=64, leaves_per_page=2)
    keys = c.ReadCap(3, key_from(size)).keys()
    stored = store(data, keys, params)
    assert params.segment_count(size) == max(1, -(-size // 64))
    assert fetch(stored, keys, list(range(4, 20))) == data
    # Every segment, the empty object's one included, has a 16-byte tag to authenticate.
    assert params.cipher_len(size, params.segment_count(size) - 1) >= c.TAG_SIZE


def test_geometry_of_default_params() -> None:
    p = c.Params()
    gib = 1 << 30
    assert p.segment_count(gib) == 1024
    assert p.block_size(gib, 0) == -(-((1 << 20) + 16) // 16)
    assert p.page_count(gib) == 1
    assert p.shard_bytes(gib) == 1024 * p.block_size(gib, 0)
    assert p.segment_at(gib, p.block_offset(gib, 5) + 3) == 5
    # a full hash page fits in one shard-store frame
    page = c.pack_page(0, 0, [bytes(32)] * p.leaves_per_page)
    assert len(page) < (1 << 20)


@pytest.mark.parametrize(
    "kwargs",
    [{"k": 0}, {"k": 21}, {"n": 257, "k": 16}, {"segment_size": 0},
     {"segment_size": c.MAX_SEGMENT_SIZE + 1}, {"leaves_per_page": 0},
     {"k": True}],
)
def test_params_out_of_range(kwargs: dict[str, int]) -> None:
    with pytest.raises(BadParameters):
        c.Params(**kwargs)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=1, max_size=2000), seed=st.integers(0, 2**32 - 1))
def test_flipped_byte_is_pinpointed(data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    params = c.Params(segment_size=50, leaves_per_page=4)
    keys = c.ReadCap(1, key_from(seed)).keys()
    stored = store(data, keys, params)
    shard = rng.randrange(N)
    pos = rng.randrange(params.shard_bytes(len(data)))
    stored.shards[shard][pos] ^= 1 << rng.randrange(8)
    segment = params.segment_at(len(data), pos)
    with pytest.raises(CorruptRecord, match=f"segment {segment} does not match") as info:
        read_blocks(stored, shard, step=rng.randrange(1, 300))
    assert info.value.blocks == (segment,)
    # blocks before the bad one were fine, and a reader started after it is too
    assert len(read_blocks(stored, shard, first=0, stop=segment)) == segment
    after = read_blocks(stored, shard, first=segment + 1)
    assert sorted(after) == list(range(segment + 1, params.segment_count(len(data))))
    # the other shards still rebuild the object
    assert fetch(stored, keys, [i for i in range(N) if i != shard][:K]) == data


def test_tampered_and_misplaced_pages_are_refused() -> None:
    params = c.Params(segment_size=10, leaves_per_page=3)
    keys = c.ReadCap(1, key_from(9)).keys()
    stored = store(bytes(range(100)), keys, params)
    page = unpack(stored.pages[(2, 0)])
    page["leaves"] = bytes(32) + page["leaves"][32:]
    stored.pages[(2, 0)] = pack(page)
    with pytest.raises(CorruptRecord, match="Merkle root"):
        read_blocks(stored, 2)
    stored.pages[(3, 0)] = stored.pages[(4, 0)]
    with pytest.raises(CorruptRecord, match="misplaced"):
        read_blocks(stored, 3)
    stored.pages[(5, 1)] = b"\xc1garbage"
    with pytest.raises(CorruptRecord, match="not a valid record"):
        read_blocks(stored, 5)
    # a shard that swapped with another's fails on its first block
    stored.shards[6], stored.shards[7] = stored.shards[7], stored.shards[6]
    with pytest.raises(CorruptRecord) as info:
        read_blocks(stored, 6)
    assert info.value.blocks == (0,)


@pytest.mark.parametrize("step", [1, 7, 13, 64, 10_000])
def test_block_reader_any_read_size(step: int) -> None:
    """Reads of any size give the same verified blocks; reads that hold whole blocks hand
    them out as views of the received bytes (no copy)."""
    params = c.Params(segment_size=48, leaves_per_page=4)
    data = bytes(range(256)) * 3
    stored = store(data, c.ReadCap(1, key_from(5)).keys(), params)
    want = read_blocks(stored, 3, step=1)
    got = read_blocks(stored, 3, step=step)
    assert {s: bytes(b) for s, b in got.items()} == {s: bytes(b) for s, b in want.items()}
    bs = params.block_size(len(data), 0)
    if step % bs == 0:
        assert all(isinstance(b, memoryview) for b in got.values())


def test_block_reader_refuses_extra_bytes() -> None:
    params = c.Params(segment_size=10, leaves_per_page=3)
    stored = store(bytes(30), c.ReadCap(1, key_from(9)).keys(), params)
    reader = c.BlockReader(params, 30, 0)
    reader.add_page(0, c.open_page(stored.pages[(0, 0)], params, 30, 0, 0, stored.roots[0][0]))
    with pytest.raises(CorruptRecord, match="more bytes"):
        reader.feed(bytes(stored.shards[0]) + b"extra")


@given(leaves=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40), data=st.data())
def test_merkle_proofs(leaves: list[bytes], data: st.DataObject) -> None:
    root = c.merkle_root(leaves)
    for i, leaf in enumerate(leaves):
        assert c.verify_proof(root, leaf, i, len(leaves), c.merkle_proof(leaves, i))
    i = data.draw(st.integers(0, len(leaves) - 1))
    proof = c.merkle_proof(leaves, i)
    forged = bytes(b ^ 0xFF for b in leaves[i])
    assert not c.verify_proof(root, forged, i, len(leaves), proof)
    if len(leaves) > 1:
        assert not c.verify_proof(root, leaves[i], i, len(leaves), proof[:-1])
    assert not c.verify_proof(root, leaves[i], len(leaves), len(leaves), proof)


def test_wrong_key_fails_authentication() -> None:
    params = c.Params(segment_size=64)
    keys = c.ReadCap(1, key_from(1)).keys()
    stored = store(b"secret " * 40, keys, params)
    other = c.ReadCap(1, key_from(2)).keys()
    with pytest.raises(AuthenticationFailed, match="segment 0 does not authenticate"):
        fetch(stored, other, list(range(K)))


def test_segments_cannot_be_reordered_or_truncated() -> None:
    key = key_from(5)
    cipher = c.SegmentCipher(key, 3)
    a, b = cipher.encrypt(0, b"first"), cipher.encrypt(1, b"second")
    assert cipher.decrypt(0, a) == b"first"
    with pytest.raises(AuthenticationFailed):
        cipher.decrypt(1, a)
    # the same segment under a shorter object (truncation) fails too
    with pytest.raises(AuthenticationFailed):
        c.SegmentCipher(key, 2).decrypt(1, b)
    with pytest.raises(CorruptRecord):
        cipher.decrypt(3, a)


def test_decrypt_into_is_decrypt_without_the_allocation() -> None:
    """A get decrypts each segment into the buffer it writes to disk from: the same plaintext,
    the same refusals (the empty segment's tag included)."""
    key = key_from(6)
    cipher = c.SegmentCipher(key, 3)
    for index, plain in [(0, os.urandom(5000)), (1, b""), (2, b"x")]:
        sealed = cipher.encrypt(index, plain)
        out = bytearray(len(plain))
        cipher.decrypt_into(index, sealed, memoryview(out))
        assert bytes(out) == plain == cipher.decrypt(index, sealed)
        tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
        with pytest.raises(AuthenticationFailed, match=f"segment {index} does not authenticate"):
            cipher.decrypt_into(index, tampered, memoryview(bytearray(len(plain))))
    sealed = cipher.encrypt(0, b"abc")
    for wrong in (2, 4):
        with pytest.raises(CorruptRecord, match="ciphertext for"):
            cipher.decrypt_into(0, sealed, memoryview(bytearray(wrong)))
    with pytest.raises(CorruptRecord):
        cipher.decrypt_into(0, b"short", memoryview(bytearray(0)))


def test_no_plaintext_run_in_any_record() -> None:
    data = (b"The quick brown fox jumps over the lazy dog. " * 200)[:8000]
    params = c.Params(segment_size=1000)
    stored = store(data, c.ReadCap(1, key_from(3)).keys(), params)
    blob = b"".join(stored.shards) + b"".join(stored.pages.values())
    windows = {data[i:i + 64] for i in range(0, len(data) - 64)}
    assert not any(blob[j:j + 64] in windows for j in range(len(blob) - 64))


def test_erasure_coder_edges() -> None:
    coder = c.ErasureCoder(16, 20)
    blocks = coder.encode(b"x" * 33)
    assert len(blocks) == 20
    assert all(len(b) == 3 for b in blocks)
    assert coder.encode_some(b"x" * 33, [19, 2]) == [blocks[19], blocks[2]]
    # A full segment's blocks are views into its ciphertext: encoding copies nothing.
    whole = bytes(range(256)) * 16
    views = coder.encode(whole)
    assert all(isinstance(b, memoryview) and b.obj is whole for b in views[:16])
    assert b"".join(views[:16]) == whole
    with pytest.raises(BadParameters):
        coder.encode_some(b"x", [20])
    with pytest.raises(CorruptRecord, match="expected 3"):
        coder.decode({i: bytes(blocks[i]) + b"!" for i in range(16)}, 33)
    with pytest.raises(NotEnoughShards):
        coder.decode({i: blocks[i] for i in range(4, 19)} | {25: b"abc"}, 33)


# -- verify capability: check and repair without the data key ---------------------------------


def test_verify_cap_repairs_ciphertext_without_decrypting() -> None:
    data = bytes(range(256)) * 9
    params = c.Params(segment_size=200, leaves_per_page=5)
    read = c.ReadCap(8, key_from(4))
    stored = store(data, read.keys(), params)
    vkeys = c.parse_cap(str(read.verify_cap())).keys()
    assert vkeys.data_key is None
    with pytest.raises(BadCapability, match="cannot decrypt"):
        vkeys.require_data_key()
    assert (vkeys.storage_index, vkeys.manifest_key) == (read.keys().storage_index, read.keys().manifest_key)
    # Shards 0-3 lost: regenerate them from 16 others, block by block, as repair does.
    coder = c.ErasureCoder(params.k, params.n)
    survivors = {i: read_blocks(stored, i) for i in range(4, 20)}
    size = len(data)
    for s in range(params.segment_count(size)):
        ciphertext = coder.decode({i: b[s] for i, b in survivors.items()}, params.cipher_len(size, s))
        regenerated = coder.encode_some(ciphertext, [0, 1, 2, 3])
        for i, block in zip([0, 1, 2, 3], regenerated, strict=True):
            assert block == read_blocks(stored, i)[s]


# -- capabilities ----------------------------------------------------------------------------


@given(owner=st.integers(0, 2**63 - 1), key=st.binary(min_size=32, max_size=32))
def test_caps_round_trip(owner: int, key: bytes) -> None:
    read = c.ReadCap(owner, key)
    text = str(read)
    assert text.startswith("tfs:")
    assert text == text.lower()
    assert c.parse_cap(text) == read
    assert c.parse_read_cap(text.upper().replace("TFS:", "tfs:")) == read
    verify = read.verify_cap()
    vtext = str(verify)
    assert vtext.startswith("tfsv:")
    assert c.parse_cap(vtext) == verify
    assert verify.verify_key != key
    assert vtext[5:] != text[4:]
    assert verify.verify_cap() is verify


def test_cap_parse_errors() -> None:
    read = c.ReadCap(42, key_from(1))
    text = str(read)
    vtext = str(read.verify_cap())
    cases = {
        "http://x": "starts with",
        "tfs:": "holds 0 bytes",
        text[:-6]: "bytes|checksum",
        text[:-1] + ("a" if text[-1] != "a" else "b"): "checksum|base32",
        text[:10] + "1" + text[11:]: "base32",
        "tfs:" + vtext[5:]: "checksum",
    }
    for bad, why in cases.items():
        with pytest.raises(BadCapability, match=why):
            c.parse_cap(bad)
    with pytest.raises(BadCapability, match="verify capability"):
        c.parse_read_cap(vtext)
    with pytest.raises(BadCapability):
        c.ReadCap(-1, key_from(1))
    with pytest.raises(BadCapability):
        c.ReadCap(1, b"short")


def test_record_ids_are_distinct_and_keyed() -> None:
    si = c.ReadCap(1, key_from(1)).keys().storage_index
    other = c.ReadCap(1, key_from(2)).keys().storage_index
    ids = {c.shard_id(si, s) for s in range(20)}
    ids |= {c.page_id(si, s, n) for s in range(20) for n in range(5)}
    ids |= {c.manifest_id(si, ns) for ns in range(40)}
    assert len(ids) == 20 + 100 + 40
    assert c.shard_id(si, 0) != c.shard_id(other, 0)
    assert all(len(i) == 32 for i in ids)


# -- manifest ----------------------------------------------------------------------------------


def make_manifest(size: int = 5000, revision: int = 1, params: c.Params | None = None) -> c.Manifest:
    p = params or c.Params(segment_size=100, leaves_per_page=7)
    pages = p.page_count(size)
    shards = tuple(
        c.ShardEntry(i, c.Placement(100 + i, 1000 + i, f"127.0.0.1:{7000 + i}"),
                     tuple(key_from(i * 100 + j) for j in range(pages)))
        for i in range(p.n)
    )
    return c.Manifest(revision, size, p, shards)


def seal(m: c.Manifest, keys: c.ObjectKeys, seed: int = 0) -> dict[str, bytes]:
    recs = c.seal_manifest(m, keys, key_from(seed)[:12])
    return {f"node{i}": r for i, r in enumerate(recs)}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), survivors=st.integers(K, N), size=st.integers(0, 10**9))
def test_manifest_round_trip_any_k(seed: int, survivors: int, size: int) -> None:
    keys = c.ReadCap(1, key_from(seed)).keys()
    m = make_manifest(size, params=c.Params(segment_size=1 << 20, leaves_per_page=100))
    recs = seal(m, keys, seed)
    kept = dict(random.Random(seed).sample(sorted(recs.items()), survivors))
    opened = c.open_manifest(kept, keys)
    assert opened.manifest == m
    assert c.Manifest.from_wire(unpack(pack(m.to_wire()))) == m
    fifteen = dict(list(kept.items())[:15])
    with pytest.raises(NotEnoughShards, match="only 15 of the 16 manifest shards needed"):
        c.open_manifest(fifteen, keys)


def test_manifest_opens_with_verify_key_and_prefers_newest_revision() -> None:
    read = c.ReadCap(1, key_from(7))
    keys = read.keys()
    m1 = make_manifest()
    m2 = m1.with_placement({3: c.Placement(555, 9000, "10.0.0.1:1")}, retire=[(3, m1.placement(3))])
    assert m2.revision == 2
    assert m2.retired == ((3, m1.placement(3)),)
    old, new = seal(m1, keys, 1), seal(m2, keys, 2)
    # 17 nodes hold revision 2, three still hold revision 1 plus garbage from one node
    mixed = {**{k: v for k, v in new.items() if k not in ("node0", "node1", "node2")},
             "node0": old["node0"], "node1": old["node1"], "node2": old["node2"], "evil": b"\x93junk"}
    opened = c.open_manifest(mixed, read.verify_cap().keys())
    assert opened.manifest == m2
    assert opened.stale == {"node0", "node1", "node2"}
    assert set(opened.bad) == {"evil"}
    # when the newest revision is short of k, an older complete one is still readable
    mix = {f"node{i}": (old if i < 16 else new)[f"node{i}"] for i in range(20)}
    assert c.open_manifest(mix, keys).manifest == m1


def test_manifest_wrong_key_and_tampering() -> None:
    keys = c.ReadCap(1, key_from(7)).keys()
    recs = seal(make_manifest(), keys)
    with pytest.raises(AuthenticationFailed, match="manifest does not authenticate"):
        c.open_manifest(recs, c.ReadCap(1, key_from(8)).keys())
    rec = unpack(recs["node4"])
    rec["block"] = bytes(len(rec["block"]))
    recs["node4"] = pack(rec)
    opened = c.open_manifest(recs, keys)
    assert "node4" in opened.bad
    assert "node4" not in opened.used


def test_manifest_validation() -> None:
    m = make_manifest()
    wire = m.to_wire()
    cases: list[tuple[Callable[[dict[str, Any]], object], str]] = [
        (lambda w: w.update(version=c.FORMAT_VERSION - 1), "version"),
        (lambda w: w.update(codec="rs"), "codec"),
        (lambda w: w["shards"].pop(), "shards 0..n-1"),
        (lambda w: w["shards"][1].update(node=w["shards"][0]["node"]), "one node"),
        (lambda w: w["shards"][0].update(pages=[]), "page roots"),
        (lambda w: w.update(k=30), "k <= n"),
        (lambda w: w.update(size=-1), "non-negative"),
        (lambda w: w.pop("retired"), "malformed"),
        (lambda w: w.update(revision=0), "revision"),
    ]
    for mutate, why in cases:
        w = unpack(pack(wire))
        mutate(w)
        with pytest.raises(BadManifest, match=why):
            c.Manifest.from_wire(w)
    with pytest.raises(BadManifest):
        c.Manifest.from_wire([1, 2])
