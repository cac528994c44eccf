"""Grid storage end to end on a devnet of 24 real node agents (issue 4 acceptance).

One devnet for the whole module, started and stopped through the real `tfgrid` command line:
4 validators, 24 node agents on 6 farms in 6 countries, every agent serving its storage
namespaces from its own shard-store child process on 127.0.0.1. The tests run in order and
share one 64 MiB object (random bytes laid out so that a leak is easy to find, see
:func:`marked_plaintext`):

1. put, get: identical bytes; the 20 shards sit on 20 distinct nodes covering all 6 farms;
2. stop 4 of those nodes: get still identical; stop a fifth: get fails with "only 15 of the 16
   ... needed are reachable (nodes ...)" and leaves no file behind;
3. two of the five come back; flip bytes in one shard file on a node's disk: get still
   identical, `check` names that shard corrupt (and the three stopped nodes unreachable),
   `repair` brings health back to 20/20 with three replacement nodes, get after repair is
   identical;
5. (before rm, while every shard is on disk) no node's data directory holds a 64-byte run of
   the plaintext;
4. the stopped nodes come back, `rm`: no shard file of the object is left on any node's disk;
6. one node's real shard store refuses a write and a delete not signed by the namespace
   owner, a replayed request, an oversized frame and a write beyond the quota, and serves a
   good request afterwards.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from cli.home import Home
from ledger.codec import hash_bytes
from ledger.keys import KeyPair
from tests.integration.clirunner import Result, run_tfgrid
from zos_agent import shardwire as w

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_NODES = 24
N_FARMS = 6
OBJECT_SIZE = 64 << 20
COMMAND_TIMEOUT_S = 300.0
WAIT_S = 60.0
RECORD = 32  # plaintext layout: 16-byte marker + 16 random bytes, repeated
MARKER_LEN = 16
NOT_ENOUGH = re.compile(r"only 15 of the 16 shards needed are reachable \(nodes (.+)\)")
SHARD_FILE = re.compile(r"[0-9a-f]{64}")


# -- the command line ------------------------------------------------------------------------------


def tfgrid(home: Path, *args: str, ok: bool = True) -> Result:
    """`tfgrid --home HOME ARGS...` as a user runs it; with ``ok`` it must succeed."""
    return run_tfgrid(home, *args, ok=ok, timeout_s=COMMAND_TIMEOUT_S)


def one_line_error(result: Result) -> str:
    assert result.code != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tfgrid: error: ")
    return lines[0]


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- the devnet ----------------------------------------------------------------------------------


@dataclass
class Node:
    name: str  # node-K
    id: int  # on the ledger
    farm: int
    data_dir: Path
    shard_port: int


@dataclass
class Grid:
    home: Path
    nodes: dict[int, Node]  # by ledger id
    farms: set[int]
    work: Path
    shared: dict[str, Any] = field(default_factory=dict)  # state passed from test to test

    def run(self, *args: str, ok: bool = True) -> Result:
        return tfgrid(self.home, *args, ok=ok)

    def stop(self, node: Node) -> None:
        assert self.run("devnet", "stop", node.name, "--json").json()["stopped"]
        # The agent takes its shard store along; wait until the port refuses connections.
        wait_until(lambda: not port_open(node.shard_port), f"{node.name}'s shard store to stop")

    def start(self, node: Node) -> None:
        self.run("devnet", "start", node.name, "--json")
        wait_until(lambda: port_open(node.shard_port), f"{node.name}'s shard store to listen")


def _alive(pid: int, started: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == started


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    base = tmp_path_factory.mktemp("storage-devnet")
    home = base / "devnet"
    try:
        t0 = time.monotonic()
        up = tfgrid(home, "devnet", "up", "--validators", "4", "--nodes", str(N_NODES),
                    "--farms", str(N_FARMS), "--timeout", "120", "--json").json()
        print(f"devnet up: {time.monotonic() - t0:.1f}s")
        nodes = {int(n["id"]): Node(n["name"], int(n["id"]), int(n["farm"]), Path(n["data_dir"]),
                                    int(n["shard_port"])) for n in up["nodes"]}
        assert len(nodes) == N_NODES
        assert all(n.shard_port for n in nodes.values())
        assert len({n.shard_port for n in nodes.values()}) == N_NODES
        tfgrid(home, "twin", "register", "storage-tester")
        work = base / "work"
        work.mkdir()
        yield Grid(home, nodes, {n.farm for n in nodes.values()}, work)
    finally:
        if (home / "devnet.json").exists():
            doc = json.loads((home / "devnet.json").read_text())
            tfgrid(home, "devnet", "down", "--json", ok=False)
            # Safety net: only the processes this devnet recorded, by pid and start time.
            for rec in [*doc["validators"], *doc["nodes"]]:
                p = rec.get("process")
                if p and _alive(p["pid"], p["started"]):
                    os.kill(p["pid"], signal.SIGKILL)


# -- helpers -------------------------------------------------------------------------------------


def marked_plaintext(size: int, seed: int) -> tuple[bytes, bytes]:
    """(plaintext, marker): 32-byte records of a random 16-byte marker then 16 random bytes.

    Every 64-byte run of this plaintext contains one whole record, hence the whole marker, so
    "no file holds the marker" proves "no file holds a 64-byte run of the plaintext" with one
    C-speed search per file (the marker is random: it appears nowhere else by chance)."""
    rng = random.Random(seed)
    marker = rng.randbytes(MARKER_LEN)
    body = rng.randbytes(size // RECORD * (RECORD - MARKER_LEN))
    step = RECORD - MARKER_LEN
    out = bytearray(size)
    view = memoryview(out)
    for i in range(size // RECORD):
        view[i * RECORD:i * RECORD + MARKER_LEN] = marker
        view[i * RECORD + MARKER_LEN:(i + 1) * RECORD] = body[i * step:(i + 1) * step]
    return bytes(out), marker


def shard_files(data_dir: Path) -> list[Path]:
    """The committed record files of every namespace of a node's shard store."""
    root = data_dir / "shards" / "ns"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/shards/*/*") if SHARD_FILE.fullmatch(p.name))


def files_holding(data_dir: Path, needle: bytes, scanned: list[int] | None = None) -> list[Path]:
    """Every regular file under ``data_dir`` that contains ``needle``; the bytes read are
    appended to ``scanned``."""
    hits = []
    for dirpath, _dirs, names in os.walk(data_dir):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue  # sockets, files that vanished meanwhile
            if scanned is not None:
                scanned.append(len(data))
            if needle in data:
                hits.append(path)
    return hits


def get_object(grid: Grid, cap: str, out: Path, expected: bytes) -> None:
    got = grid.run("storage", "get", cap, "-o", str(out), "--json").json()
    assert got["size"] == len(expected)
    assert out.read_bytes() == expected
    out.unlink()


def check(grid: Grid, cap: str) -> dict[str, Any]:
    doc = dict(grid.run("storage", "check", cap, "--json").json())
    assert set(doc) >= {"cap", "healthy", "needed", "total", "shards"}
    assert all(set(s) >= {"index", "node", "state"} for s in doc["shards"])
    return doc


# -- acceptance 1-5 --------------------------------------------------------------------------------


def test_1_put_get_identical_on_20_distinct_nodes_across_all_farms(grid: Grid) -> None:
    seed = random.randrange(2**32)
    print(f"plaintext seed {seed}")
    plaintext, marker = marked_plaintext(OBJECT_SIZE, seed)
    src = grid.work / "object.bin"
    src.write_bytes(plaintext)
    t0 = time.monotonic()
    put = grid.run("storage", "put", str(src), "--json").json()
    t_put = time.monotonic() - t0
    assert set(put) >= {"cap", "size", "k", "n", "nodes"}
    assert (put["size"], put["k"], put["n"]) == (OBJECT_SIZE, 16, 20)
    assert put["cap"].startswith("tfs:")
    nodes = [int(n) for n in put["nodes"]]
    assert len(nodes) == 20
    assert len(set(nodes)) == 20
    assert {grid.nodes[n].farm for n in nodes} == grid.farms  # spread over every farm
    t0 = time.monotonic()
    get_object(grid, put["cap"], grid.work / "back.bin", plaintext)
    t_get = time.monotonic() - t0
    print(f"64 MiB: put {t_put:.1f}s, get {t_get:.1f}s (whole CLI commands)")
    ls = grid.run("storage", "ls", "--json").json()
    assert [e["cap"] for e in ls] == [put["cap"]]
    assert ls[0]["size"] == OBJECT_SIZE
    grid.shared.update(cap=put["cap"], plaintext=plaintext, marker=marker, placed=nodes)


def test_2_four_nodes_down_still_reads_a_fifth_down_fails_cleanly(grid: Grid) -> None:
    cap, plaintext, placed = grid.shared["cap"], grid.shared["plaintext"], grid.shared["placed"]
    down = [grid.nodes[n] for n in placed[:5]]
    for node in down[:4]:
        grid.stop(node)
    get_object(grid, cap, grid.work / "four-down.bin", plaintext)

    grid.stop(down[4])
    empty = grid.work / "five-down"
    empty.mkdir()
    out = empty / "object.bin"
    err = one_line_error(grid.run("storage", "get", cap, "-o", str(out), ok=False))
    m = NOT_ENOUGH.search(err)
    assert m is not None, err
    named = {int(x) for x in re.findall(r"(?:^|, )(\d+): ", m.group(1))}
    assert named == {n.id for n in down}, err
    assert list(empty.iterdir()) == []  # no output file, no partial temp file
    grid.shared["down"] = down


def test_3_corrupt_shard_is_named_and_repair_moves_to_replacements(grid: Grid) -> None:
    cap, plaintext, placed = grid.shared["cap"], grid.shared["plaintext"], grid.shared["placed"]
    down: list[Node] = grid.shared["down"]
    back, still_down = down[3:], down[:3]
    for node in back:
        grid.start(node)
    # Flip bytes in the middle of the biggest record file (the shard itself) of a live node.
    victim = grid.nodes[placed[10]]
    shard = max(shard_files(victim.data_dir), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    assert size > OBJECT_SIZE // 16  # a shard, not a hash page or the manifest
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        old = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in old))

    get_object(grid, cap, grid.work / "corrupt.bin", plaintext)  # 16 good shards are enough

    report = check(grid, cap)
    states = {s["node"]: s["state"] for s in report["shards"]}
    assert states[victim.id] == "corrupt", report
    assert all(states[n.id] == "unreachable" for n in still_down), report
    assert (report["healthy"], report["needed"], report["total"]) == (16, 16, 20)

    repaired = grid.run("storage", "repair", cap, "--json").json()
    assert repaired["healthy"] == 20, repaired
    moved_to = {m["to"] for m in repaired["moved"]}
    assert {m["from"] for m in repaired["moved"]} == {n.id for n in still_down}
    assert len(moved_to) == 3
    assert not moved_to & set(placed)
    after = check(grid, cap)
    assert (after["healthy"], after["total"]) == (20, 20), after
    assert all(s["state"] == "ok" for s in after["shards"])
    now_on = {s["node"] for s in after["shards"]}
    assert len(now_on) == 20
    assert not now_on & {n.id for n in still_down}
    get_object(grid, cap, grid.work / "repaired.bin", plaintext)
    grid.shared.update(still_down=still_down, now_on=now_on)


def test_5_no_data_dir_holds_a_64_byte_run_of_the_plaintext(grid: Grid) -> None:
    marker: bytes = grid.shared["marker"]
    on_disk = sum(len(shard_files(n.data_dir)) for n in grid.nodes.values())
    assert on_disk >= 20 * 3  # every placement's shard, hash page and manifest shard
    t0 = time.monotonic()
    scanned: list[int] = []
    leaks = [p for n in grid.nodes.values() for p in files_holding(n.data_dir, marker, scanned)]
    print(f"plaintext scan of {N_NODES} data dirs: {len(scanned)} files, "
          f"{sum(scanned) / (1 << 20):.1f} MiB in {time.monotonic() - t0:.2f}s")
    assert leaks == []
    assert sum(scanned) >= OBJECT_SIZE * 20 // 16  # at least every shard was read
    # The scan finds the marker where it is: the test's own copy of the plaintext.
    assert files_holding(grid.work, marker) == [grid.work / "object.bin"]


def test_4_rm_leaves_no_shard_file_on_any_node(grid: Grid) -> None:
    cap = grid.shared["cap"]
    for node in grid.shared["still_down"]:  # they still hold the retired shards
        grid.start(node)
    before = {n.name: shard_files(n.data_dir) for n in grid.nodes.values()}
    assert sum(map(len, before.values())) >= 20 * 3
    doc = grid.run("storage", "rm", cap, "--json").json()
    assert doc["failed"] == []
    left = {name: files for n in grid.nodes.values() if (files := shard_files(n.data_dir))
            for name in (n.name,)}
    assert left == {}
    assert grid.run("storage", "ls", "--json").json() == []
    err = one_line_error(grid.run("storage", "get", cap, "-o", str(grid.work / "gone.bin"),
                                  ok=False))
    assert "no manifest" in err or "reachable" in err, err
    assert not (grid.work / "gone.bin").exists()


# -- acceptance 6: one node's shard store refuses what it must -------------------------------------


class RawStore:
    """One connection to a shard store, speaking the wire protocol directly (sans-IO client)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = w.ClientConnection()

    @classmethod
    async def open(cls, port: int) -> RawStore:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def answer(self) -> w.Response | None:
        """The next answer, or None once the store closed the connection."""
        with trio.fail_after(10):
            while True:
                resp = self.conn.next_response()
                if not isinstance(resp, w.NeedData):
                    return resp
                try:
                    data = await self.stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                self.conn.receive_data(bytes(data))

    async def call(self, req: w.Request) -> w.Response | None:
        await self.send_raw(self.conn.send(req))
        return await self.answer()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _code(resp: w.Response | None) -> str:
    assert isinstance(resp, w.Error), resp
    return resp.code.value


def test_6_shard_store_refuses_foreign_replayed_oversized_and_over_quota(grid: Grid) -> None:
    # A small object brings the owner's namespaces back (rm cancelled them).
    small = grid.work / "small.bin"
    small.write_bytes(os.urandom(300_000))
    cap = grid.run("storage", "put", str(small), "--json").json()["cap"]
    contracts = grid.run("contract", "list", "--json").json()
    ns_doc = next(c for c in contracts
                  if c["state"] != "cancelled" and c["workloads"][0]["kind"] == "namespace"
                  and c["workloads"][0]["endpoint"])
    ns = int(ns_doc["id"])
    port = int(ns_doc["workloads"][0]["endpoint"].rsplit(":", 1)[1])
    owner = Home(grid.home).load_identity()
    chain_id = json.loads((grid.home / "devnet.json").read_text())["chain_id"]
    stranger = KeyPair.from_seed(os.urandom(32))
    nonce = [time.time_ns() // 1000]

    def next_nonce() -> int:
        nonce[0] += 1
        return nonce[0]

    async def scenario() -> None:
        store = await RawStore.open(port)

        async def stat() -> w.StatResult:
            resp = await store.call(w.Stat(ns))
            assert isinstance(resp, w.StatResult), resp
            return resp

        first = await stat()

        # a good write, then a stranger's write and delete, and a forged signature
        sid = os.urandom(32)
        data = os.urandom(4096)
        good = w.upload_requests(owner, chain_id, ns, sid, data, next_nonce())
        assert len(good) == 1
        assert isinstance(await store.call(good[0]), w.Stored)
        foreign = w.upload_requests(stranger, chain_id, ns, os.urandom(32), data, next_nonce())[0]
        assert _code(await store.call(foreign)) in ("not_owner", "bad_signature")
        assert _code(await store.call(
            w.make_delete(stranger, chain_id, ns, sid, next_nonce()))) in ("not_owner", "bad_signature")
        forged_put = w.make_put(stranger, chain_id, ns, os.urandom(32), len(data), data,
                                next_nonce(), shard_hash=hash_bytes(data))
        forged = w.Put(forged_put.ns, forged_put.shard_id, forged_put.size, forged_put.hash,
                       forged_put.nonce, owner.public_key, forged_put.sig, forged_put.data)
        assert _code(await store.call(forged)) == "bad_signature"

        # a replayed write and a replayed delete (the same signed bytes again)
        assert _code(await store.call(good[0])) == "replay"
        delete = w.make_delete(owner, chain_id, ns, sid, next_nonce())
        assert isinstance(await store.call(delete), w.Deleted)
        assert _code(await store.call(delete)) == "replay"

        # a write beyond the quota is refused before any byte is stored
        now = await stat()
        beyond = now.quota - now.used + 1
        over = w.make_put(owner, chain_id, ns, os.urandom(32), beyond,
                          os.urandom(min(beyond, w.MAX_CHUNK)), next_nonce())
        assert _code(await store.call(over)) == "quota_exceeded"
        last = await stat()
        assert (last.count, last.used) == (first.count, first.used)  # nothing refused was kept
        await store.aclose()

        # an oversized frame: answered too_large, that connection closed
        big = await RawStore.open(port)
        await big.send_raw(struct.pack(">II", w.MAX_HEADER + 1, 0) + b"\0" * 1024)
        assert _code(await big.answer()) == "too_large"
        assert await big.answer() is None
        await big.aclose()

        # ... and the store keeps serving others
        again = await RawStore.open(port)
        sid2 = os.urandom(32)
        assert isinstance(await again.call(
            w.upload_requests(owner, chain_id, ns, sid2, data, next_nonce())[0]), w.Stored)
        got = await again.call(w.Get(ns, sid2, 0, len(data)))
        assert isinstance(got, w.Data)
        assert got.data == data
        assert isinstance(await again.call(w.make_delete(owner, chain_id, ns, sid2, next_nonce())),
                          w.Deleted)
        await again.aclose()

    trio.run(scenario)
    out = grid.work / "small-back.bin"
    get_object(grid, cap, out, small.read_bytes())
    grid.run("storage", "rm", cap, "--json")
