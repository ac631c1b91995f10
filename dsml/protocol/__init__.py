"""The wire protocol without I/O: the codec (:mod:`.codec`), each node's methods and their
header rules (:mod:`.methods`), the hard limits (:mod:`.limits`).  No Twisted here."""
