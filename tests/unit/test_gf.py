"""threebot.storage._gf (GF(2^8) multiply-accumulate) against a plain Python reference, and
ErasureCoder's encode and decode, which use it for parity blocks and for missing primary
blocks, against zfec's own encode and decode."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import pytest
import zfec
from hypothesis import given, settings
from hypothesis import strategies as st

from threebot.storage import _gf
from threebot.storage import codec as c

IMPLS = _gf.implementations()


def gf_mul(a: int, b: int) -> int:
    """Carry-less multiply, reduced by x^8 + x^4 + x^3 + x^2 + 1 (0x11D)."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
    return product


MUL_TABLES = [bytes(gf_mul(a, x) for x in range(256)) for a in range(256)]


def ref_combine(coefs: bytes, inputs: list[bytes], nout: int) -> list[bytes]:
    size = len(inputs[0]) if inputs else 0
    out = []
    for r in range(nout):
        acc = 0
        for j, block in enumerate(inputs):
            acc ^= int.from_bytes(block.translate(MUL_TABLES[coefs[r * len(inputs) + j]]), "little")
        out.append(acc.to_bytes(size, "little"))
    return out


def random_coefs(rng: random.Random, count: int) -> bytes:
    # Weighted so that 0 and 1, which the kernels may special-case, turn up often.
    return bytes(rng.choice((0, 1, rng.randrange(256), rng.randrange(256))) for _ in range(count))


def test_reference_field() -> None:
    assert gf_mul(2, 0x80) == 0x1D
    assert gf_mul(0x53, 0xCA) == gf_mul(0xCA, 0x53)
    # Every nonzero element has an inverse: the polynomial is irreducible.
    assert all(any(gf_mul(a, b) == 1 for b in range(1, 256)) for a in range(1, 256))


def test_implementations() -> None:
    assert IMPLS[-1] == "scalar"
    assert set(IMPLS) <= {"gfni", "avx2", "scalar"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [0, 1, 31, 32, 33, 63, 64, 65, 4095, 65536 + 17])
@pytest.mark.parametrize(("nin", "nout"), [(1, 1), (3, 2), (16, 4), (4, 7), (2, 9)])
def test_combine_matches_reference(impl: str, length: int, nin: int, nout: int) -> None:
    rng = random.Random(f"{impl} {length} {nin} {nout}")
    coefs = random_coefs(rng, nin * nout)
    inputs = [rng.randbytes(length) for _ in range(nin)]
    outputs = [bytearray(rng.randbytes(length)) for _ in range(nout)]  # stale bytes are overwritten
    _gf.combine(coefs, inputs, outputs, impl=impl)
    assert [bytes(o) for o in outputs] == ref_combine(coefs, inputs, nout)


@pytest.mark.parametrize("impl", IMPLS)
def test_combine_every_coefficient(impl: str) -> None:
    """Each of the 256 coefficients times every byte value, at an offset that leaves a tail."""
    values = bytes(range(256)) * 2 + b"\x80\x01\xff"
    for coef in range(256):
        out = bytearray(len(values))
        _gf.combine(bytes([coef]), [values], [out], impl=impl)
        assert out == values.translate(MUL_TABLES[coef]), coef


@pytest.mark.parametrize("impl", IMPLS)
def test_combine_writes_into_views(impl: str) -> None:
    rng = random.Random(7)
    inputs = [rng.randbytes(100) for _ in range(3)]
    coefs = random_coefs(rng, 6)
    whole = bytearray(b"\xee" * 300)
    view = memoryview(whole)
    _gf.combine(coefs, inputs, [view[0:100], view[200:300]], impl=impl)
    expected = ref_combine(coefs, inputs, 2)
    assert whole == expected[0] + b"\xee" * 100 + expected[1]


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_combine_property(data: st.DataObject) -> None:
    nin = data.draw(st.integers(1, 6))
    nout = data.draw(st.integers(1, 6))
    length = data.draw(st.integers(0, 300))
    coefs = data.draw(st.binary(min_size=nin * nout, max_size=nin * nout))
    inputs = [data.draw(st.binary(min_size=length, max_size=length)) for _ in range(nin)]
    expected = ref_combine(coefs, inputs, nout)
    for impl in IMPLS:
        outputs = [bytearray(length) for _ in range(nout)]
        _gf.combine(coefs, inputs, outputs, impl=impl)
        assert [bytes(o) for o in outputs] == expected, impl


def test_combine_many_rows() -> None:
    rng = random.Random(3)
    coefs = random_coefs(rng, 256 * 2)
    inputs = [rng.randbytes(70) for _ in range(256)]
    outputs = [bytearray(70), bytearray(70)]
    _gf.combine(coefs, inputs, outputs)
    assert [bytes(o) for o in outputs] == ref_combine(coefs, inputs, 2)


# -- argument checks ----------------------------------------------------------------------


def test_combine_rejects_bad_arguments() -> None:
    a, b = b"x" * 8, b"y" * 8
    out = bytearray(8)
    with pytest.raises(ValueError, match="coefs must hold"):
        _gf.combine(b"\x01", [a, b], [out])
    with pytest.raises(ValueError, match="1 to 256"):
        _gf.combine(b"", [], [out])
    with pytest.raises(ValueError, match="1 to 256"):
        _gf.combine(b"", [a], [])
    with pytest.raises(ValueError, match="1 to 256"):
        _gf.combine(bytes(257), [a] * 257, [out])
    with pytest.raises(TypeError, match="sequence of buffers"):
        _gf.combine(b"\x01", 5, [out])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not one buffer"):
        _gf.combine(b"\x01", a, [out])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"inputs\[1\] is not a bytes-like object"):
        _gf.combine(b"\x01\x01", [a, "text"], [out])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _gf.combine("\x01", [a], [out])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one length"):
        _gf.combine(b"\x01\x01", [a, b"short"], [out])
    with pytest.raises(ValueError, match="one length"):
        _gf.combine(b"\x01", [a], [bytearray(9)])
    with pytest.raises(BufferError, match=r"outputs\[0\] is not a writable"):
        _gf.combine(b"\x01", [a], [bytes(8)])
    with pytest.raises(BufferError, match=r"inputs\[0\] is not a contiguous"):
        _gf.combine(b"\x01", [memoryview(bytes(16))[::2]], [out])
    with pytest.raises(ValueError, match="unknown implementation"):
        _gf.combine(b"\x01", [a], [out], impl="sse9")
    with pytest.raises(TypeError):
        _gf.combine(b"\x01", [a], [out], impl=3)  # type: ignore[arg-type]


def test_combine_rejects_overlap() -> None:
    whole = bytearray(32)
    view = memoryview(whole)
    with pytest.raises(ValueError, match=r"outputs\[0\] overlaps inputs\[1\]"):
        _gf.combine(b"\x01\x01", [b"z" * 16, view[8:24]], [view[0:16]])
    with pytest.raises(ValueError, match=r"outputs\[1\] overlaps outputs\[0\]"):
        _gf.combine(b"\x01\x01", [b"z" * 16], [view[0:16], view[15:31]])
    _gf.combine(b"\x01\x01", [b"z" * 16], [view[0:16], view[16:32]])  # adjacent is fine
    assert whole == b"z" * 32


def test_combine_releases_buffers_on_error() -> None:
    out = bytearray(8)
    with pytest.raises(ValueError, match="one length"):
        _gf.combine(b"\x01\x01", [bytearray(8)], [out, bytearray(9)])
    with pytest.raises(BufferError):
        _gf.combine(b"\x01\x01", [b"a" * 8], [out, b"b" * 8])
    out.extend(b"!")  # a buffer still exported could not be resized


# -- ErasureCoder.decode against zfec -----------------------------------------------------


def zfec_decode(k: int, n: int, blocks: dict[int, bytes], length: int) -> bytes:
    chosen = sorted(blocks)[:k]
    parts = zfec.Decoder(k, n).decode([blocks[i] for i in chosen], chosen)
    return b"".join(parts)[:length]


def encode(k: int, n: int, data: bytes) -> list[bytes]:
    size = -(-len(data) // k) if data else 1
    padded = data + bytes(size * k - len(data))
    return [bytes(b) for b in zfec.Encoder(k, n).encode([padded[i * size:(i + 1) * size] for i in range(k)])]


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_decode_matches_zfec(data: st.DataObject) -> None:
    k, n = data.draw(st.sampled_from([(16, 20), (1, 3), (3, 5), (10, 16)]))
    length = data.draw(st.integers(0, 40 * k))
    payload = data.draw(st.binary(min_size=length, max_size=length))
    blocks = encode(k, n, payload)
    lost_primaries = data.draw(st.integers(0, min(k, n - k)))
    lost = data.draw(st.permutations(range(k)))[:lost_primaries]
    kept = [i for i in range(n) if i not in lost]
    drop_more = data.draw(st.integers(0, len(kept) - k))
    kept = data.draw(st.permutations(kept))[drop_more:]
    got = {i: blocks[i] for i in kept}
    out = c.ErasureCoder(k, n).decode(got, length)
    assert out == zfec_decode(k, n, got, length) == payload
    assert len(out) == length


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_encode_matches_zfec(data: st.DataObject) -> None:
    k, n = data.draw(st.sampled_from([(16, 20), (1, 3), (3, 5), (10, 16), (4, 4), (1, 256)]))
    length = data.draw(st.integers(0, 40 * k))
    payload = data.draw(st.binary(min_size=length, max_size=length))
    coder = c.ErasureCoder(k, n)
    expected = encode(k, n, payload)
    assert [bytes(b) for b in coder.encode(payload)] == expected
    wanted = data.draw(st.lists(st.integers(0, n - 1), max_size=n))
    assert [bytes(b) for b in coder.encode_some(payload, wanted)] == [expected[i] for i in wanted]


@pytest.mark.parametrize("length", [1 << 20, (1 << 20) + 16, (1 << 20) - 1000, 65, 17])
def test_encode_full_segments_every_impl(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 MiB segments as stored (64 KiB blocks, the SIMD kernels' full width, and a tail) with
    every implementation this CPU has: byte for byte zfec's parity."""
    k, n = 16, 20
    payload = os.urandom(length)
    expected = encode(k, n, payload)
    plain_combine = _gf.combine
    for impl in IMPLS:
        def combine(coefs: bytes, inputs: object, outputs: object, impl: str = impl) -> None:
            plain_combine(coefs, inputs, outputs, impl=impl)
        monkeypatch.setattr(_gf, "combine", combine)
        blocks = c.ErasureCoder(k, n).encode(payload)
        assert [bytes(b) for b in blocks] == expected, impl


def test_encode_parity_blocks_are_fresh_per_call() -> None:
    """Each call's parity lives in a buffer of its own: blocks queued for upload from one
    segment are never overwritten by the next segment's encode."""
    coder = c.ErasureCoder(16, 20)
    first = coder.encode(b"a" * 4096)
    keep = [bytes(b) for b in first]
    coder.encode(b"b" * 4096)
    assert [bytes(b) for b in first] == keep


@pytest.mark.parametrize("missing", [(0,), (3, 9), (0, 1, 14), (0, 1, 14, 15), (2, 5, 7, 11)])
def test_decode_full_segments(missing: tuple[int, ...]) -> None:
    """1 MiB segments as stored: 64 KiB blocks, the SIMD kernels' full width."""
    k, n = 16, 20
    coder = c.ErasureCoder(k, n)
    for length in (1 << 20, (1 << 20) - 1000):
        payload = os.urandom(length)
        blocks = encode(k, n, payload)
        got = {i: memoryview(b) for i, b in enumerate(blocks) if i not in missing}
        out = coder.decode(got, length)
        assert out == zfec_decode(k, n, {i: blocks[i] for i in got}, length) == payload


def test_decode_result_is_accepted_downstream() -> None:
    """A degraded decode returns a memoryview: AES-GCM (segments and manifests) and repair's
    re-encode take it as it is."""
    params = c.Params(segment_size=4096)
    size = 10_000
    plaintext = os.urandom(size)
    keys = c.ReadCap(1, bytes(range(32))).keys()
    cipher = c.SegmentCipher(keys.require_data_key(), params.segment_count(size))
    coder = c.ErasureCoder(params.k, params.n)
    for s in range(params.segment_count(size)):
        off, span = params.segment_span(size, s)
        seg = c.encode_segment(cipher, coder, s, plaintext[off:off + span])
        degraded = {i: seg.blocks[i] for i in range(4, 20)}
        assert isinstance(coder.decode(degraded, params.cipher_len(size, s)), memoryview)
        assert c.decode_segment(cipher, coder, params, size, s, degraded) == plaintext[off:off + span]
        ciphertext = coder.decode(degraded, params.cipher_len(size, s))
        assert coder.encode_some(ciphertext, [0, 3]) == [seg.blocks[0], seg.blocks[3]]
    placement = [c.ShardEntry(i, c.Placement(100 + i, 200 + i), (bytes(32),)) for i in range(20)]
    manifest = c.Manifest(1, size, params, tuple(placement))
    records = c.seal_manifest(manifest, keys, bytes(12))
    opened = c.open_manifest({f"node{i}": records[i] for i in range(2, 20)}, keys)
    assert opened.manifest == manifest


def test_decode_healthy_returns_bytes() -> None:
    coder = c.ErasureCoder(16, 20)
    for length in (100, 112):
        whole = coder.decode(dict(enumerate(encode(16, 20, b"q" * length))), length)
        assert isinstance(whole, bytes)
        assert whole == b"q" * length


def test_decode_rows_cache_shared_by_threads() -> None:
    """Many threads decode at once through one coder, with more block sets than the cache
    keeps, so rows are computed, reused and evicted concurrently."""
    k, n = 8, 12
    coder = c.ErasureCoder(k, n)
    payloads = [os.urandom(k * 512 - s) for s in range(8)]
    encoded = [encode(k, n, p) for p in payloads]
    subsets = list(combinations(range(n), k))
    rng = random.Random(11)
    jobs = [(rng.randrange(len(payloads)), rng.choice(subsets)) for _ in range(1500)]

    def run(job: tuple[int, tuple[int, ...]]) -> bool:
        which, subset = job
        blocks = {i: encoded[which][i] for i in subset}
        return coder.decode(blocks, len(payloads[which])) == payloads[which]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, inside the cache's critical section too
    try:
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(run, jobs))
    finally:
        sys.setswitchinterval(interval)
    assert len(coder._rows) <= c._DECODE_ROWS_CACHED


def test_decode_rows_computed_once_per_block_set() -> None:
    k, n = 4, 7
    coder = c.ErasureCoder(k, n)
    probes: list[tuple[int, ...]] = []
    real = coder._decoder

    class Counting:
        def decode(self, blocks: tuple[bytes, ...], chosen: tuple[int, ...]) -> list[bytes]:
            probes.append(chosen)
            return list(real.decode(blocks, chosen))

    coder._decoder = Counting()
    payload = os.urandom(4000)
    blocks = encode(k, n, payload)
    for subset in [(1, 2, 3, 4), (0, 2, 5, 6), (1, 2, 3, 4), (0, 1, 2, 3), (0, 2, 5, 6)] * 3:
        assert coder.decode({i: blocks[i] for i in subset}, len(payload)) == payload
    assert probes == [(1, 2, 3, 4), (0, 2, 5, 6)]


def test_a_missing_extension_is_named() -> None:
    """Without the built extension the codec says what to run, not just 'No module named'."""
    code = ("import sys; sys.modules['threebot.storage._gf'] = None\n"
            "import threebot.storage.codec")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert proc.returncode != 0
    assert "C extension, is not built: run ./scripts/bootstrap.sh" in proc.stderr
