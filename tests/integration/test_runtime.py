"""The container runtime against real runc, real loop volumes and real host networking.

Needs root (CI runs as root). Every test owns its runc root, data dir, bridge and /24 (picked
free among 10.213.x.0/24); at teardown it deletes its containers, tears its network down and
asserts the bridge, netns, iptables chains and volumes are gone. Host sysctls it may flip are
restored. Only addresses in namespaces the tests create are ever contacted.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from zos_agent.errors import ImageError, RuntimeFailure
from zos_agent.images import ImageStore, build_busybox_rootfs, push_image
from zos_agent.network import NETNS_DIR, NodeNetwork
from zos_agent.oci import ContainerSpec
from zos_agent.runtime import Runtime

MIB = 1024 * 1024
WAIT_S = 15.0

needs_root_runc = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runc") is None or not Path("/bin/busybox").exists(),
    reason="needs root, runc and busybox-static",
)


@dataclass(frozen=True)
class Image:
    ref: str
    sources: list[str]
    blob: Path


@pytest.fixture(scope="module")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> Image:
    base = tmp_path_factory.mktemp("img")
    rootfs = build_busybox_rootfs(base / "rootfs")
    ref, sources = push_image(rootfs, base / "published")
    return Image(ref, sources, base / "published" / f"{ref.split(':')[1]}.tar")


async def wait_for(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until true; fail after WAIT_S (bounded, no fixed sleeps)."""
    with trio.move_on_after(WAIT_S):
        while True:  # the kernel and runc give no event to wait on
            if await check():
                return
            await trio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


# Tiny host lookups (sysfs, procfs, tmp dirs) made from async tests.
def exists(path: str | Path) -> bool:
    return Path(path).exists()


def read(path: str | Path) -> str:
    return Path(path).read_text()


def run_out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


# --- images (no root needed) ------------------------------------------------------------------


def test_push_is_deterministic_and_accepts_a_tar(busybox: Image, tmp_path: Path) -> None:
    rootfs = build_busybox_rootfs(tmp_path / "again")
    ref, sources = push_image(rootfs, tmp_path / "pub")
    assert ref == busybox.ref
    assert sources == [(tmp_path / "pub" / f"{ref[7:]}.tar").resolve().as_uri()]
    ref2, _ = push_image(busybox.blob, tmp_path / "pub2")
    assert ref2 == busybox.ref
    with pytest.raises(ImageError):
        push_image(tmp_path / "missing", tmp_path / "pub")
    (tmp_path / "not.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ImageError):
        push_image(tmp_path / "not.tar", tmp_path / "pub")


def test_build_script_makes_the_same_image(busybox: Image, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-busybox-image.sh"
    out = subprocess.run([str(script), str(tmp_path / "rootfs"), str(tmp_path / "pub")],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert doc["image"] == busybox.ref
    assert doc["sources"] == [(tmp_path / "pub" / f"{busybox.ref[7:]}.tar").as_uri()]


async def test_ensure_verifies_digest_and_caches(busybox: Image, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "cache")
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    # A source whose bytes do not hash to the reference is refused, and nothing is cached.
    with pytest.raises(ImageError, match="digest mismatch"):
        await store.ensure(busybox.ref, [str(other)])
    assert not store.has(busybox.ref)
    # Sources are tried in order: a bad one, then a good one.
    copy = tmp_path / "copy.tar"
    shutil.copy(busybox.blob, copy)
    rootfs = await store.ensure(busybox.ref, [str(other), "file:///nonexistent.tar", str(copy)])
    assert (rootfs / "bin" / "busybox").is_file()
    assert os.readlink(rootfs / "bin" / "sh") == "busybox"
    assert (rootfs / "data").is_dir()
    assert (rootfs / "proc").is_dir()
    # Cached by digest: the source can vanish.
    copy.unlink()
    assert await store.ensure(busybox.ref, []) == rootfs
    assert [p.name for p in (tmp_path / "cache" / "rootfs").iterdir()] == [busybox.ref[7:]]
    with pytest.raises(ImageError):
        await store.ensure("sha256:xyz", [str(busybox.blob)])


@pytest.mark.parametrize(
    "kind", ["escape", "absolute-hardlink", "relative-hardlink", "device", "symlink-escape"]
)
async def test_unsafe_tars_refused(kind: str, tmp_path: Path) -> None:
    blob = tmp_path / "evil.tar"
    with tarfile.open(blob, "w") as tar:
        if kind == "escape":
            info = tarfile.TarInfo("../../evil")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        elif kind.endswith("hardlink"):
            info = tarfile.TarInfo("passwd")
            info.type = tarfile.LNKTYPE
            info.linkname = "/etc/passwd" if kind.startswith("absolute") else "../../../etc/passwd"
            tar.addfile(info)
        elif kind == "device":
            info = tarfile.TarInfo("dev/sda")
            info.type = tarfile.BLKTYPE
            info.devmajor, info.devminor = 8, 0
            tar.addfile(info)
        else:
            link = tarfile.TarInfo("etc")
            link.type = tarfile.SYMTYPE
            link.linkname = "/tmp"
            tar.addfile(link)
            info = tarfile.TarInfo("etc/evil")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    ref, sources = push_image(blob, tmp_path / "pub")
    store = ImageStore(tmp_path / "cache")
    with pytest.raises(ImageError):
        await store.ensure(ref, sources)
    assert not store.has(ref)
    assert not exists("/tmp/evil")


# --- containers -------------------------------------------------------------------------------


def _subnets_in_use() -> set[int]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return {int(m) for m in re.findall(r"inet 10\.213\.(\d+)\.", out)}


def _host_net_traces(net: NodeNetwork) -> list[str]:
    """Anything of ``net`` still on the host."""
    traces = []
    if Path(f"/sys/class/net/{net.bridge}").exists():
        traces.append(f"bridge {net.bridge}")
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    traces += [line for line in rules.splitlines() if f"TF-{net.agent_id}-" in line]
    if NETNS_DIR.is_dir():
        traces += [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"tf-{net.agent_id}-")]
    return traces


@pytest.fixture
def restore_sysctls() -> Iterator[None]:
    names = ["net/ipv4/ip_forward", "net/ipv4/conf/lo/route_localnet"]
    saved = {n: Path("/proc/sys", n).read_text() for n in names}
    yield
    # These are shared by every agent network on the host: leave them while another one
    # (another test run, a devnet) still has its bridge up.
    if not any(p.name.startswith("tfb") for p in Path("/sys/class/net").iterdir()):
        for n, v in saved.items():
            Path("/proc/sys", n).write_text(v)


@dataclass
class Node:
    runtime: Runtime
    network: NodeNetwork
    runc_root: Path
    data_dir: Path


@pytest.fixture
async def node_factory(
    tmp_path: Path, restore_sysctls: None
) -> AsyncIterator[Callable[[str], Awaitable[Node]]]:
    made: list[Node] = []
    taken = _subnets_in_use()

    async def make(name: str) -> Node:
        index = next(i for i in range(200, 256) if i not in taken)
        taken.add(index)
        agent_id = f"t{secrets.token_hex(3)}"
        net = NodeNetwork(agent_id=agent_id, subnet_index=index)
        await net.setup()
        node = Node(
            Runtime(
                runc_root=tmp_path / name / "runc",
                data_dir=tmp_path / name / "data",
                images=ImageStore(tmp_path / name / "images"),
                network=net,
                log_limit=64 * 1024,
            ),
            net,
            tmp_path / name / "runc",
            tmp_path / name / "data",
        )
        made.append(node)
        return node

    yield make
    with trio.CancelScope(shield=True):
        for node in made:
            await node.runtime.delete_all()
            assert await node.runtime.list() == {}
            await node.network.teardown()
            assert _host_net_traces(node.network) == []
            assert not any(
                exists(Path("/sys/fs/cgroup", c, node.runtime.cgroup_parent))
                for c in ("memory", "cpu", "pids")
            )


def runc_ids(root: Path) -> list[str]:
    out = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


def container(image: Image, wid: str, script: str, **kw: Any) -> ContainerSpec:
    return ContainerSpec(workload_id=wid, image=image.ref, command=["sh", "-c", script], **kw)


async def stopped(rt: Runtime, wid: str) -> bool:
    st = (await rt.list()).get(wid)
    return st is not None and st.status == "stopped"


@pytest.mark.slow
@needs_root_runc
async def test_container_isolation_limits_volume_and_logs(
    busybox: Image, node_factory: Callable[[str], Awaitable[Node]]
) -> None:
    node = await node_factory("a")
    rt = node.runtime
    script = """
        echo "env: $GREETING $TOKEN"
        grep -E '^(NoNewPrivs|CapEff)' /proc/self/status
        touch /rootfs-write 2>/dev/null && echo "rootfs: writable" || echo "rootfs: read-only"
        echo hello > /data/hello && echo "data: writable"
        dd if=/dev/zero of=/data/fill bs=1M count=64 2>/dev/null && echo "quota: none" \
            || echo "quota: enforced"
        i=0; while [ $i -lt 5000 ]; do echo "noise line $i"; i=$((i+1)); done
        echo done
        exec sleep 3600
    """
    spec = container(busybox, "c1-app", script, env={"GREETING": "hi"},
                     secret_env={"TOKEN": "s3cret"}, cpu=1, memory=64 * MIB, disk=16 * MIB)
    assert await rt.create(spec, busybox.sources) == []

    async def finished() -> bool:
        return (await rt.logs("c1-app")).endswith(b"done\n")

    await wait_for("script output", finished)
    log = await rt.logs("c1-app")
    # Capped at log_limit, the tail kept.
    assert len(log) <= 64 * 1024
    assert b"noise line 4999\n" in log
    assert b"noise line 0\n" not in log
    state = (await rt.list())["c1-app"]
    assert state.status == "running"
    assert state.spec_hash == spec.spec_hash()
    # The early lines were rotated away; run a second container for the checks' output.
    checks = container(busybox, "c1-checks", script.replace("while [ $i -lt 5000 ]", "while false"),
                       env={"GREETING": "hi"}, secret_env={"TOKEN": "s3cret"}, disk=16 * MIB)
    await rt.create(checks, busybox.sources)

    async def checks_done() -> bool:
        return (await rt.logs("c1-checks")).endswith(b"done\n")

    await wait_for("checks", checks_done)
    out = (await rt.logs("c1-checks")).decode()
    assert "env: hi s3cret" in out
    assert re.search(r"NoNewPrivs:\s+1", out)
    cap_eff = int(re.search(r"CapEff:\s+([0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]
    assert cap_eff & (1 << 21) == 0  # CAP_SYS_ADMIN dropped
    assert cap_eff & (1 << 10)  # CAP_NET_BIND_SERVICE kept
    assert "rootfs: read-only" in out
    assert "data: writable" in out
    assert "quota: enforced" in out

    # cgroup limits as the kernel sees them.
    cg = rt.cgroups_path("c1-app")
    mem = read(Path("/sys/fs/cgroup/memory", cg.lstrip("/"), "memory.limit_in_bytes"))
    assert int(mem) == 64 * MIB
    quota = read(Path("/sys/fs/cgroup/cpu", cg.lstrip("/"), "cpu.cfs_quota_us"))
    assert int(quota) == 100_000

    # Own namespaces (pid, mount, uts, ipc, net) differ from the host's.
    pid = state.pid
    for ns in ("pid", "mnt", "uts", "ipc", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns

    # runc sees it under this runtime's root only.
    assert sorted(runc_ids(node.runc_root)) == ["c1-app", "c1-checks"]
    other = await node_factory("b")
    assert await other.runtime.list() == {}
    assert runc_ids(other.runc_root) == []

    # Nothing in the runtime's own process tree listens: the shim holds no socket at all.
    shim = json.loads((rt.bundle_dir("c1-app") / "shim.json").read_text())["pid"]
    fds = [os.readlink(f"/proc/{shim}/fd/{fd}") for fd in os.listdir(f"/proc/{shim}/fd")]
    assert not [f for f in fds if f.startswith("socket:")]

    # delete removes container, bundle, volume, network namespace, logs.
    volume = rt.volumes.mount_path("c1-app")
    assert volume.is_mount()
    await rt.delete("c1-app")
    await rt.delete("c1-app")  # idempotent
    assert "c1-app" not in runc_ids(node.runc_root)
    assert "c1-app" not in await rt.list()
    assert not rt.bundle_dir("c1-app").exists()
    assert not volume.exists()
    assert not rt.volumes.image_path("c1-app").exists()
    assert not rt.log_path("c1-app").exists()
    assert not node.network.netns_path("c1-app").exists()
    assert not exists(Path("/sys/fs/cgroup/memory", cg.lstrip("/")))


@pytest.mark.slow
@needs_root_runc
async def test_exit_codes_restart_and_adoption(
    busybox: Image, node_factory: Callable[[str], Awaitable[Node]]
) -> None:
    node = await node_factory("a")
    rt = node.runtime
    spec = container(busybox, "c2-job", "echo run >> /data/runs; cat /data/runs | wc -l; exit 3",
                     disk=8 * MIB, restart="on-failure")
    await rt.create(spec, busybox.sources)
    await wait_for("exit", lambda: stopped(rt, "c2-job"))
    st = (await rt.list())["c2-job"]
    assert st.exit_code == 3
    assert st.spec_hash == spec.spec_hash()
    # create() of an existing container with the same spec does nothing (no duplicate).
    await rt.create(spec, busybox.sources)
    assert (await rt.list())["c2-job"].exit_code == 3
    # restart keeps the volume.
    await rt.restart("c2-job")
    await wait_for("second exit", lambda: stopped(rt, "c2-job"))
    assert (await rt.logs("c2-job")).split() == [b"1", b"2"]

    # A long-running one killed from outside reports 128+9.
    sleeper = container(busybox, "c2-sleep", "exec sleep 3600", disk=8 * MIB)
    await rt.create(sleeper, busybox.sources)
    first = (await rt.list())["c2-sleep"]
    assert first.status == "running"

    # Adoption: a new Runtime on the same root and disk (an agent restart) sees the same
    # containers with their spec hashes, and create() leaves the running one alone.
    again = Runtime(runc_root=node.runc_root, data_dir=node.data_dir,
                    images=ImageStore(node.data_dir.parent / "images"), network=node.network)
    adopted = await again.list()
    assert adopted["c2-sleep"].pid == first.pid
    assert adopted["c2-sleep"].spec_hash == sleeper.spec_hash()
    await again.create(sleeper, [])
    assert (await again.list())["c2-sleep"].pid == first.pid
    assert runc_ids(node.runc_root).count("c2-sleep") == 1

    os.kill(first.pid, 9)
    await wait_for("killed", lambda: stopped(again, "c2-sleep"))
    assert (await again.list())["c2-sleep"].exit_code == 137

    # A changed spec replaces the container.
    changed = container(busybox, "c2-sleep", "exec sleep 3601", disk=8 * MIB)
    await again.create(changed, busybox.sources)
    now = (await again.list())["c2-sleep"]
    assert now.status == "running"
    assert now.spec_hash == changed.spec_hash() != sleeper.spec_hash()


@pytest.mark.slow
@needs_root_runc
async def test_failed_create_leaves_nothing(
    busybox: Image, node_factory: Callable[[str], Awaitable[Node]]
) -> None:
    node = await node_factory("a")
    rt = node.runtime
    bad = ContainerSpec(workload_id="c3-bad", image=busybox.ref, command=["/no/such/binary"],
                        disk=8 * MIB, ports=[80])
    with pytest.raises(RuntimeFailure, match="c3-bad"):
        await rt.create(bad, busybox.sources)
    assert await rt.list() == {}
    assert runc_ids(node.runc_root) == []
    assert not rt.volumes.image_path("c3-bad").exists()
    assert not node.network.netns_path("c3-bad").exists()
    missing = ContainerSpec(workload_id="c3-img", image="sha256:" + "0" * 64, command=["true"])
    with pytest.raises(ImageError):
        await rt.create(missing, busybox.sources)
    assert await rt.list() == {}


@pytest.mark.slow
@needs_root_runc
async def test_published_port_answers_http(
    busybox: Image, node_factory: Callable[[str], Awaitable[Node]]
) -> None:
    node = await node_factory("a")
    rt = node.runtime
    spec = ContainerSpec(workload_id="c4-web", image=busybox.ref,
                         command=["httpd", "-f", "-p", "80", "-h", "/www"], disk=8 * MIB,
                         ports=[80])
    endpoints = await rt.create(spec, busybox.sources)
    assert len(endpoints) == 1
    host, port = endpoints[0].rsplit(":", 1)
    assert host == "127.0.0.1"
    assert 20000 <= int(port) < 30000
    assert (await rt.list())["c4-web"].endpoints == tuple(endpoints)

    def get() -> bytes:
        with urllib.request.urlopen(f"http://{endpoints[0]}/", timeout=2) as resp:
            body: bytes = resp.read()
            return body

    body = b""

    async def answers() -> bool:
        nonlocal body
        try:
            body = await trio.to_thread.run_sync(get)
        except OSError:
            return False
        return True

    await wait_for("http answer", answers)
    assert body == b"hello from tfgrid busybox\n"
    # Idempotent attach: the same endpoint after an agent restart and after restart().
    assert await rt.create(spec, []) == endpoints
    await rt.restart("c4-web")
    assert (await rt.list())["c4-web"].endpoints == tuple(endpoints)
    await wait_for("http answer after restart", answers)
    await rt.delete("c4-web")
    rules = run_out("iptables-save", "-t", "nat")
    assert f"--dport {port}" not in rules


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A stand-in for "the internet": a netns of our own at 10.214.<i>.2 behind a veth whose
    host side is 10.214.<i>.1, running busybox httpd with a CGI that echoes the client's
    address. Yields (server address, host-side address); removes everything afterwards."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used = {int(m) for m in re.findall(r"inet 10\.214\.(\d+)\.", out)}
    index = next(i for i in range(200, 256) if i not in used)
    tag = secrets.token_hex(3)
    ns, veth = f"tftest-out-{tag}", f"tvo{tag}"
    host_ip, server_ip = f"10.214.{index}.1", f"10.214.{index}.2"
    www = tmp_path / "outside-www"
    (www / "cgi-bin").mkdir(parents=True)
    cgi = www / "cgi-bin" / "whoami"
    cgi.write_text("#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\necho \"client=$REMOTE_ADDR\"\n")
    cgi.chmod(0o755)
    server: subprocess.Popen[bytes] | None = None
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
            ["ip", "addr", "add", f"{host_ip}/24", "dev", veth],
            ["ip", "link", "set", veth, "up"],
            ["ip", "-n", ns, "addr", "add", f"{server_ip}/24", "dev", "eth0"],
            ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "/bin/busybox", "httpd", "-f", "-p", "8080", "-h", str(www)]
        )
        yield server_ip, host_ip
    finally:
        if server is not None:
            server.kill()  # by pid: the one process this fixture started
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
@needs_root_runc
async def test_outbound_nat(
    busybox: Image, node_factory: Callable[[str], Awaitable[Node]], outside: tuple[str, str]
) -> None:
    server_ip, host_ip = outside
    node = await node_factory("a")
    rt = node.runtime
    # (no wget -T: Debian's busybox-static 1.35 wget segfaults with it)
    script = f"""
        i=0
        while [ $i -lt 200 ]; do
            wget -q -O- http://{server_ip}:8080/cgi-bin/whoami && break
            i=$((i+1)); sleep 0.05
        done
        ip -4 -o addr show dev eth0 2>/dev/null || ifconfig eth0
        echo done
    """
    await rt.create(container(busybox, "c5-out", script, disk=8 * MIB), busybox.sources)
    await wait_for("outbound request", lambda: stopped(rt, "c5-out"))
    out = (await rt.logs("c5-out")).decode()
    # The server saw the node's address (maybe v4-mapped), not the container's: masqueraded.
    assert re.search(rf"^client=(\[::ffff:)?{re.escape(host_ip)}\]?$", out, re.M), out
    assert re.search(rf"10\.213\.{node.network.subnet_index}\.\d+", out), out


@pytest.mark.slow
@needs_root_runc
async def test_list_hides_containers_being_created(
    busybox: Image, node_factory: Callable[[str], Awaitable[Node]]
) -> None:
    node = await node_factory("a")
    rt = node.runtime
    spec = container(busybox, "c6-busy", "exec sleep 3600", disk=8 * MIB)
    seen_during: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.create, spec, busybox.sources)
        await trio.lowlevel.checkpoint()  # create now holds the lock, waiting on runc
        seen_during.append(dict(await rt.list()))
    assert seen_during == [{}]
    assert (await rt.list())["c6-busy"].status == "running"
