"""The blocking Python client (the seed's Client and RPC), for users and the ``dsml`` command.

    with Client("127.0.0.1", 7401, token="...") as c:       # one storage server
        c.set("greeting", b"hello")
        c.get("greeting")
        c.upload("data.bin", "datasets/data.bin")
        c.download("datasets/data.bin", "copy.bin")
        c.call("ping", {})          # any method: (head, payload), errors raised

    with ClusterClient.from_config() as c:                  # the whole cluster
        c.upload("data.bin", "datasets/data.bin")

The rooms: :mod:`.server` (:class:`Client`, one server), :mod:`.cluster`
(:class:`ClusterClient` and :class:`Job`).  The records they return (:class:`Entry`,
:class:`Stored`, ...) live in :mod:`dsml.protocol.replies`, shared with the async client
of the cluster's own nodes (:mod:`dsml.net.cluster_client`); every name is importable
from here.
"""

from __future__ import annotations

from ..errors import ChecksumMismatch, ConnectionLost, DsmlError, OutcomeUnknown
from ..protocol.replies import Entry, ListedKey, Located, Node, Stored, job_body
from .cluster import ClusterClient, Job, JobFailed
from .server import CHUNK, SMALL_READ, Client, Progress

__all__ = [
    "CHUNK",
    "SMALL_READ",
    "ChecksumMismatch",
    "Client",
    "ClusterClient",
    "ConnectionLost",
    "DsmlError",
    "Entry",
    "Job",
    "JobFailed",
    "ListedKey",
    "Located",
    "Node",
    "OutcomeUnknown",
    "Progress",
    "Stored",
    "job_body",
]
