"""Ledger throughput and commit latency: real validator processes on loopback.

Starts ``--validators`` validators (``python -m ledger.node``) with fresh homes in a temporary
directory, funds ``--senders`` accounts in genesis, pre-signs transfers, then measures:

* light load: one client submitting one transfer at a time and waiting for its block;
* full load: every sender pipelining its transfers (nonce-ordered, a bounded window each)
  to one of the validators, all at once (an overload: latency is mostly queueing);
* half load: the same senders paced to half the committed rate full load reached.

The senders of the full and half loads run in ``--client-procs`` separate processes, started
before the validators and handed their pre-signed txs before the timed window, so that client
work is not done by the process that timestamps commits.

Committed tx/s = txs included in blocks / wall time from the first submission to the commit of
the last one. Latency is from sending ``submit_tx`` to receiving the committed header that
contains the tx (header subscription on the first validator). Printed next to them, the limit
they are measured against: this machine's ed25519 verifications per second (pynacl, one core),
measured in the same run before the validators start (every tx is verified once per
validator, and the validators share the machine's cores), and the CPU time the validators
spent per committed tx, which does not depend on what else the machine runs as much as the
rates do (the load average is printed too).

    .venv/bin/python bench/ledger_throughput.py [--validators 4] [--senders 64] [--txs 100]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ledger.codec import hash_bytes  # noqa: E402
from ledger.config import init_validator_home, make_genesis  # noqa: E402
from ledger.keys import KeyPair, is_valid  # noqa: E402
from ledger.tx import Tx  # noqa: E402
from ledger.types import Block  # noqa: E402
from ledger.wire import NEED_DATA, FrameDecoder, encode_frame  # noqa: E402

CHAIN_ID = "bench"
FEE = 10_000
WINDOW = 64  # in-flight submissions per sender connection


def ed25519_verify_per_s(seconds: float = 1.0) -> float:
    key = KeyPair.from_seed(b"\x42" * 32)
    msg = b"tfgrid-bench" * 10
    sig = key.sign(msg)
    n = 0
    start = time.perf_counter()
    while True:
        for _ in range(200):
            is_valid(key.public_key, msg, sig)
        n += 200
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def read_line(pipe: Any, timeout_s: float) -> bytes:
    sel = selectors.DefaultSelector()
    sel.register(pipe, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout_s
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(pipe.fileno(), 1)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    return buf


class Conn:
    """A bare framed connection to a validator (the bench measures the validators, not a
    verifying client)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(64 * 1024 * 1024)
        self.next_id = 0

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> Conn:
        return cls(await trio.open_tcp_stream(*addr))

    async def send(self, msg: Any) -> None:
        await self.stream.send_all(encode_frame(msg, 64 * 1024 * 1024))

    async def receive(self) -> Any:
        while True:
            msg = self.decoder.next_message()
            if msg is not NEED_DATA:
                return msg
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError("validator closed the connection")
            self.decoder.receive_data(data)

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        self.next_id += 1
        await self.send({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.receive()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]


@dataclass
class Tracker:
    """Submit and commit times per tx hash, filled by the senders and the header watcher."""

    submitted: dict[bytes, float] = field(default_factory=dict)
    committed: dict[bytes, float] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    blocks: list[tuple[int, int, float]] = field(default_factory=list)  # height, txs, time
    new_commit: trio.Event = field(default_factory=trio.Event)


async def watch_headers(addr: tuple[str, int], tracker: Tracker,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    conn = await Conn.open(addr)
    await conn.call("subscribe_headers", {})
    task_status.started()
    while True:
        msg = await conn.receive()
        if msg.get("push") != "header":
            continue
        now = time.perf_counter()
        block = Block.from_wire(msg["block"])
        tracker.blocks.append((block.header.height, len(block.txs), now))
        for raw in block.txs:
            tracker.committed[hash_bytes(raw)] = now
        tracker.new_commit.set()
        tracker.new_commit = trio.Event()


async def pipelined_sender(conn: Conn, txs: list[bytes], tracker: Tracker,
                           interval_s: float | None, offset_s: float) -> None:
    """Send this sender's txs in nonce order with up to WINDOW unanswered requests; with
    ``interval_s`` one every ``interval_s`` seconds (starting ``offset_s`` late), else flat out."""
    window = trio.Semaphore(WINDOW)
    ids: dict[int, bytes] = {}

    async def reader() -> None:
        for _ in range(len(txs)):
            msg = await conn.receive()
            h = ids.pop(msg["id"])
            if "error" in msg:
                code = msg["error"]["code"]
                tracker.refused[code] = tracker.refused.get(code, 0) + 1
                tracker.submitted.pop(h, None)
            window.release()

    begin = trio.current_time() + offset_s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for i, raw in enumerate(txs):
            if interval_s is not None:
                await trio.sleep_until(begin + i * interval_s)
            await window.acquire()
            conn.next_id += 1
            h = hash_bytes(raw)
            ids[conn.next_id] = h
            tracker.submitted[h] = time.perf_counter()
            await conn.send({"id": conn.next_id, "method": "submit_tx", "params": {"tx": raw}})
    await conn.stream.aclose()


# A sender job: (validator address, pre-signed txs, pacing interval or None, pacing offset).
Job = tuple[tuple[str, int], list[bytes], float | None, float]


async def run_jobs(start_at: float, jobs: list[Job]) -> tuple[dict[bytes, float], dict[str, int]]:
    """Connect every job's sender, wait for ``start_at`` (``time.perf_counter``, which is
    CLOCK_MONOTONIC and so shared by the processes of the machine), then send."""
    tracker = Tracker()
    conns = [await Conn.open(addr) for addr, _, _, _ in jobs]
    await trio.sleep(max(0.0, start_at - time.perf_counter()))
    async with trio.open_nursery() as nursery:
        for conn, (_, raws, interval, offset) in zip(conns, jobs, strict=True):
            nursery.start_soon(pipelined_sender, conn, raws, tracker, interval, offset)
    return tracker.submitted, tracker.refused


def client_process(pipe: Connection) -> None:
    """A client process: runs the sender jobs it is sent until it receives None."""
    while True:
        work = pipe.recv()
        if work is None:
            return
        start_at, jobs = work
        pipe.send(trio.run(run_jobs, start_at, jobs))


class Clients:
    """The client processes. Each gets its share of the senders of a load phase."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process running trio
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(theirs,), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def run(self, jobs: list[Job], tracker: Tracker) -> float:
        """Hand the jobs out, start them together, fill ``tracker``; returns the start time."""
        shares: list[list[Job]] = [[] for _ in self.pipes]
        for i, job in enumerate(jobs):
            shares[i % len(shares)].append(job)
        start_at = time.perf_counter() + 1.0  # time to receive the txs and connect
        for pipe, share in zip(self.pipes, shares, strict=True):
            pipe.send((start_at, share))
        for pipe in self.pipes:
            submitted, refused = await trio.to_thread.run_sync(pipe.recv)
            tracker.submitted.update(submitted)
            for code, n in refused.items():
                tracker.refused[code] = tracker.refused.get(code, 0) + n
        return start_at

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc; 0.0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f}"


@dataclass
class Machine:
    """What the CPU figures need: the validators' and clients' process ids, the core count."""

    validator_pids: list[int]
    clients: Clients
    cpus: int


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def signed_transfers(key: KeyPair, nonces: range, sink: bytes) -> list[bytes]:
    return [Tx("transfer", key.public_key, n, FEE, {"to": sink, "amount": 1})
            .signed(key, CHAIN_ID).encode() for n in nonces]


async def run_load(name: str, addrs: list[tuple[str, int]], batches: list[list[bytes]],
                   tracker: Tracker, rate: float | None, machine: Machine) -> float:
    """Submit every batch (one per sender, spread over the validators) from the client
    processes and wait until all accepted txs are committed. ``rate`` (tx/s, total) paces
    the senders; None is flat out. Prints the figures and returns the committed tx/s."""
    total = sum(len(b) for b in batches)
    tracker.committed.clear()
    tracker.refused.clear()
    tracker.submitted.clear()
    first_block = len(tracker.blocks)
    interval = None if rate is None else len(batches) / rate
    jobs: list[Job] = []
    for i, raws in enumerate(batches):
        offset = 0.0 if interval is None else interval * i / len(batches)
        jobs.append((addrs[i % len(addrs)], raws, interval, offset))
    cpu_v0 = cpu_seconds(machine.validator_pids)
    cpu_c0 = cpu_seconds(machine.clients.pids())
    start_at = await machine.clients.run(jobs, tracker)
    accepted = {hash_bytes(r) for raws in batches for r in raws} & tracker.submitted.keys()
    start = min((tracker.submitted[h] for h in accepted), default=start_at)
    submit_s = max((tracker.submitted[h] for h in accepted), default=start) - start
    with trio.move_on_after(120):
        while not accepted <= tracker.committed.keys():
            await tracker.new_commit.wait()
    cpu_v = cpu_seconds(machine.validator_pids) - cpu_v0
    cpu_c = cpu_seconds(machine.clients.pids()) - cpu_c0
    done = [h for h in accepted if h in tracker.committed]
    end = max((tracker.committed[h] for h in done), default=start)
    tps = len(done) / (end - start) if end > start else 0.0
    lats = [tracker.committed[h] - tracker.submitted[h] for h in done]
    sizes = [n for _, n, _ in tracker.blocks[first_block:] if n]
    offered = "flat out" if rate is None else f"offered {rate:.0f} tx/s"
    print(f"{name}: {len(batches)} senders in {len(machine.clients.pipes)} client processes, "
          f"{total} txs {offered} (accepted {len(accepted)}, submitted in {submit_s:.2f} s)")
    print(f"    {tps:8.1f} tx/s committed over {end - start:.2f} s, "
          f"latency p50 {percentile(lats, 50) * 1000:7.1f} ms  p99 {percentile(lats, 99) * 1000:7.1f} ms, "
          f"{len(sizes)} blocks of mean {statistics.mean(sizes) if sizes else 0:.0f} txs "
          f"(max {max(sizes, default=0)})")
    if done:
        per_tx = cpu_v / len(done)
        # Flat out, the validators are busy all the time: their CPU time per tx tells what
        # the machine's cores would commit if nothing else ran (an extrapolation: contention
        # itself costs CPU time too). Paced, blocks are smaller and each request and gossip
        # frame carries fewer txs, so a tx costs more.
        estimate = (f"; {machine.cpus} cores given to the validators alone would commit about "
                    f"{machine.cpus / per_tx:,.0f} tx/s" if rate is None else "")
        print(f"    validators' CPU {per_tx * 1e6:6.0f} us per committed tx, all validators "
              f"together, {cpu_v / (end - start):.1f} cores busy (clients "
              f"{cpu_c / len(done) * 1e6:.0f} us){estimate}; {load_average()}")
    if tracker.refused:
        print(f"    refused: {tracker.refused}")
    if len(done) < len(accepted):
        print(f"    NOT COMMITTED within 120 s: {len(accepted) - len(done)} txs")
    return tps


async def run_bench(addrs: list[tuple[str, int]], senders: list[KeyPair], txs_per_sender: int,
                    light_txs: int, sink: bytes, machine: Machine) -> None:
    # Measure a live chain: every validator connected to all others and past height 1.
    with trio.fail_after(60):
        for addr in addrs:
            while True:
                conn = await Conn.open(addr)
                st = await conn.call("status", {})
                await conn.stream.aclose()
                if st["peers"] == len(addrs) - 1 and st["height"] >= 2:
                    break
                await trio.sleep(0.1)
    tracker = Tracker()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_headers, addrs[0], tracker)

        # -- light load: one tx at a time, each waiting for its block ----------------------
        light_key = senders[0]
        conn = await Conn.open(addrs[1 % len(addrs)])
        lats: list[float] = []
        light = signed_transfers(light_key, range(light_txs), sink)
        first_block = len(tracker.blocks)
        cpu_v0 = cpu_seconds(machine.validator_pids)
        start = time.perf_counter()
        for raw in light:
            h = hash_bytes(raw)
            t0 = time.perf_counter()
            await conn.call("submit_tx", {"tx": raw})
            while h not in tracker.committed:
                await tracker.new_commit.wait()
            lats.append(tracker.committed[h] - t0)
        light_s = time.perf_counter() - start
        cpu_v = cpu_seconds(machine.validator_pids) - cpu_v0
        blocks = max(1, len(tracker.blocks) - first_block)
        await conn.stream.aclose()
        print(f"light load: 1 sender, {light_txs} txs one at a time: "
              f"{light_txs / light_s:.1f} tx/s committed, latency p50 "
              f"{percentile(lats, 50) * 1000:.1f} ms  p99 {percentile(lats, 99) * 1000:.1f} ms")
        print(f"    {blocks} blocks; validators' CPU {cpu_v / blocks * 1000:.1f} ms per block, "
              f"all validators together; {load_average()}")

        # -- full load: every sender flat out, then paced at half the rate reached ---------
        users = senders[1:]
        full = [signed_transfers(k, range(txs_per_sender), sink) for k in users]
        tps = await run_load("full load", addrs, full, tracker, None, machine)
        half_rate = max(tps / 2, 1.0)
        per_sender = max(1, int(half_rate * 6 / len(users)))  # about six seconds of load
        paced = [signed_transfers(k, range(txs_per_sender, txs_per_sender + per_sender), sink)
                 for k in users]
        await run_load("half load", addrs, paced, tracker, half_rate, machine)
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validators", type=int, default=4)
    ap.add_argument("--senders", type=int, default=64, help="concurrent senders at full load")
    ap.add_argument("--txs", type=int, default=100, help="transfers per sender at full load")
    ap.add_argument("--light-txs", type=int, default=100)
    ap.add_argument("--client-procs", type=int, default=2,
                    help="processes running the full and half load senders")
    ap.add_argument("--max-block-txs", type=int, default=None,
                    help="override the validators' block size limit (txs)")
    ap.add_argument("--keep", action="store_true", help="keep the validator homes (logs)")
    args = ap.parse_args()

    clients = Clients(args.client_procs)  # before the validators: spawning costs CPU
    verify_s = ed25519_verify_per_s()
    cpus = os.cpu_count() or 1
    # Each validator checks each tx's signature once (admission, or a block bringing it).
    ceiling = verify_s * min(cpus, args.validators) / args.validators
    print(f"machine: {cpus} cpus, {load_average()}, ed25519 verify {verify_s:,.0f}/s on one "
          f"core (pynacl); if signature checks were the only cost, {args.validators} "
          f"validators sharing {min(cpus, args.validators)} cores could commit at most "
          f"{ceiling:,.0f} tx/s")

    root = Path(tempfile.mkdtemp(prefix="tfgrid-bench-"))
    vkeys = [KeyPair.from_seed(bytes([0xB0 + i]) * 32) for i in range(args.validators)]
    senders = [KeyPair.from_seed(i.to_bytes(4, "big") * 8) for i in range(args.senders + 1)]
    sink = KeyPair.from_seed(b"\xee" * 32).public_key
    genesis = make_genesis(CHAIN_ID, [k.public_key for k in vkeys],
                           [(k.public_key, 10**15) for k in senders], {}, int(time.time() * 1000))
    addrs = [("127.0.0.1", p) for p in free_ports(args.validators)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, key in enumerate(vkeys):
            home = root / f"v{i}"
            init_validator_home(home, genesis=genesis, seed=key.seed, listen=addrs[i], peers=addrs,
                                empty_block_interval_ms=1000)
            if args.max_block_txs is not None:
                cfg_path = home / "config.json"
                doc = json.loads(cfg_path.read_text())
                doc["max_block_txs"] = args.max_block_txs
                cfg_path.write_text(json.dumps(doc))
            with open(home / "node.log", "ab") as log:
                p = subprocess.Popen([sys.executable, "-m", "ledger.node", "--home", str(home),
                                      "--log-level", "INFO" if args.keep else "WARNING"],
                                     stdout=subprocess.PIPE, stderr=log, cwd=REPO)
            procs.append(p)
            line = read_line(p.stdout, 30)
            if not line.startswith(b"listening"):
                raise SystemExit(f"validator {i} did not start; see {home / 'node.log'}")
        print(f"{args.validators} validators on loopback, homes in {root}")
        machine = Machine([p.pid for p in procs], clients, cpus)
        trio.run(run_bench, addrs, senders, args.txs, args.light_txs, sink, machine)
    finally:
        clients.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
