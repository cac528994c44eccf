"""The peer API message shapes (framed msgpack over TCP, see :mod:`ledger.wire`).

Clients and validators use one frame format. Every message is a str-keyed map.

Client requests carry an integer ``id`` echoed in the response::

    {"id": 7, "method": "status", "params": {}}
    {"id": 7, "result": {...}}                       # success
    {"id": 7, "error": {"code": "...", "message": "..."}}   # refusal, connection stays open

Methods (``params`` -> ``result``):

- ``status`` {} -> {"chain_id", "height", "block_hash", "validators": [hex...], "peers": int,
  "mempool": int}
- ``submit_tx`` {"tx": bytes} -> {"accepted": True, "tx_hash": bytes}; a refused tx answers an
  error whose ``code`` is the :class:`~ledger.errors.InvalidTx` code (``bad_signature``,
  ``bad_nonce``, ``insufficient_funds``, ``malformed``, ``too_large``, ``unknown_type``,
  ``name_taken``, ``mempool_full``, ...) and whose message is human-readable.
- ``block`` {"height": int} -> {"block": <Block wire>, "commit": <Commit wire>} where the
  commit is the certificate of exactly that block (from the next block, or the validator's
  latest decided commit). ``height`` 0 means the latest committed block.
- ``query`` {"key": bytes, "height": int (0 = latest)} -> {"height", "value": bytes|None,
  "proof": <proof wire>}; the proof verifies against the state root of the header at
  ``height``.
- ``subscribe_headers`` {} -> {"subscribed": True}, then unsolicited pushes
  ``{"push": "header", "block": <Block wire>, "commit": <Commit wire>}`` for each new
  committed block, in height order.
- ``subscribe_key`` {"key": bytes} -> {"subscribed": True}, then pushes
  ``{"push": "event", "key": bytes, "height": int}`` whenever a committed block changed that
  key (the client re-queries with a proof: events are hints, not evidence).

Validator connections start with a handshake in which both sides prove possession of a
validator key over a fresh challenge bound to the chain id (domain ``tfgrid/handshake/v1``)::

    {"hello": {"chain_id", "genesis_hash": bytes, "key": bytes, "challenge": bytes}}
    {"auth": {"signature": bytes}}      # signs [their challenge, our key, genesis hash]

then exchange gossip messages ``{"gossip": "proposal", "proposal": <wire>, "block": <wire>}``,
``{"gossip": "vote", "vote": <wire>}``, ``{"gossip": "txs", "txs": [bytes, ...]}`` (up to
512 txs; the single ``{"gossip": "tx", "tx": bytes}`` is accepted too) and
``{"gossip": "status", "height": int}`` and may use the client methods too (``block`` is
how a lagging validator catches up).
"""

from __future__ import annotations

DOMAIN_HANDSHAKE = "tfgrid/handshake/v1"
CLIENT_MAX_FRAME = 4 * 1024 * 1024
PEER_MAX_FRAME = 16 * 1024 * 1024
