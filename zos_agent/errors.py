"""The node agent's error family.

Every error zos_agent raises derives from :class:`ledger.errors.TfgridError`; no third-party
exception (subprocess, tarfile, urllib, OSError) leaks out of its public API.
"""

from __future__ import annotations

from ledger.errors import TfgridError


class AgentError(TfgridError):
    """Base of the node agent's errors."""


class RuntimeFailure(AgentError):
    """The container runtime could not do what was asked: runc failed or timed out, a bundle or
    volume could not be prepared (e.g. loop devices are unavailable), a container is unknown."""


class ImageError(RuntimeFailure):
    """An image reference is malformed, no source could be fetched, the fetched bytes do not
    match the digest, or the tar is unsafe to unpack (paths outside the rootfs, device nodes)."""


class NetworkError(RuntimeFailure):
    """Host networking for a container could not be set up or torn down (iproute2/iptables
    failed or timed out, no free address or port)."""


class InvalidSpec(AgentError):
    """A container spec cannot be run as given: malformed workload id or image reference, empty
    command, non-positive limits, bad port numbers, an env name that is not a valid name."""
