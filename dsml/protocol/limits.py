"""Hard limits of the dsml wire protocol.

Every length the parser accepts is bounded by one of these names; docs/protocol.md
lists them and explains where each number comes from.
"""

import re

#: Longest header line (start line included), in bytes, not counting its CRLF.
#: memcached closes at 2 KiB; a Key header must fit a MAX_KEY-byte key with room to spare.
MAX_LINE = 2048

#: Largest header block (start line, header lines and the blank line), in bytes.
#: twisted.web, h11 and Node all use 16 KiB.
MAX_HEAD = 16 * 1024

#: Most header lines in one message; our headers are a small fixed vocabulary.
MAX_HEADERS = 64

#: Longest header name.
MAX_HEADER_NAME = 64

#: Most ASCII digits in a Length header (just under 1 TB).
MAX_LENGTH_DIGITS = 12

#: Most ASCII digits in a request id.
MAX_ID_DIGITS = 12

#: Largest key, in UTF-8 bytes.
MAX_KEY = 1024

#: Default largest value payload (a config key can change it per server).
DEFAULT_VALUE_MAX = 1024 * 1024

#: Largest payload of a small, buffered request (auth, stat, list, ...).
SMALL_PAYLOAD_MAX = 64 * 1024

#: Most bytes a connection may send before it has authenticated: an ``auth`` request
#: (a Token of at most 1 KiB and a Client name) fits with room to spare; anything more,
#: before the auth is done, closes the connection.
PREAUTH_MAX = 8 * 1024

#: Largest payload the parser will read and throw away after rejecting a request
#: (unknown method, bad key, too large).  A larger one is a framing error and
#: closes the connection: draining a terabyte to keep a connection is not worth it.
MAX_SKIP = 64 * 1024 * 1024

#: Largest file payload: anything a Length header can say; files are streamed.
FILE_MAX = 10**MAX_LENGTH_DIGITS - 1

#: Most task slots a worker may declare, and so the most one task may ask for.
MAX_SLOTS = 1024
#: Most GPUs a worker may declare, and so the most one task may ask for.
MAX_GPUS = 64
#: Largest task result a worker carries in its report of the attempt and the master keeps
#: with the success (a task's declared ``result`` output; a bigger one is uploaded).
MAX_INLINE_RESULT = 64 * 1024
#: Most memory, in bytes, a worker may declare or a task ask for (1 PiB).
MAX_MEM = 1 << 50
#: A GPU id a worker declares: an index ("0"), a UUID ("GPU-5f3c..."), a MIG id: 1 to
#: 128 of A-Z a-z 0-9 _ . : - (it goes into CUDA_VISIBLE_DEVICES, comma-separated).
GPU_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")
#: What a worker runs function tasks with (``Fn-Runtime``: its Python's major.minor and
#: cloudpickle's version, :func:`dsml.fnrun.runtime`): up to 128 of A-Z a-z 0-9 _ . + = -
#: and spaces ("" for none declared).
FN_RUNTIME = re.compile(r"[A-Za-z0-9_.+= -]{0,128}\Z")

#: A worker's name: 1 to 64 of A-Z a-z 0-9 _ . - (a config key, a header value, a
#: directory-safe word).  One rule for the config, the wire and the master.
WORKER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
#: The same rule, said to a person.
WORKER_NAME_RULE = "1 to 64 of A-Z a-z 0-9 _ . -"
