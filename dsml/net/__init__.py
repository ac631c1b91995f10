"""The net layer: Twisted protocols that drive the sans-IO codec (:mod:`dsml.protocol`).

The rooms:

- :mod:`.connection`: one connection's framing, authentication, deadlines and limits;
- :mod:`.answering`: the peer's requests answered in order (slots, held requests, replies,
  downloads by a pull producer);
- :mod:`.calling`: this side's own requests on a two-way link and their responses (a
  payload streamed from a file, a response streamed into a sink);
- :mod:`.sinks`: where a downloaded payload goes (a file renamed when verified, memory);
- :mod:`.cluster_client`: the async cluster client (the worker's, the simulation's);
- :mod:`.responders`: ``@responder`` and the tables binding each method to its spec, the
  roles that may call it and its handler;
- :mod:`.server`: the accepting side (``ServerFactory``, the token check);
- :mod:`.links`: the dialling side (``LinkFactory``, ``Links``, ``AddressEndpoint``);
- :mod:`.listen`: listening on a TCP address;
- :mod:`.limits`: the connection limits (no Twisted: the config imports it);
- :mod:`.twisted_private`: every use of a Twisted private attribute.

Nothing is imported here, so :mod:`dsml.config` can import :mod:`.limits` without Twisted.
"""
