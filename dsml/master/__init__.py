"""The master: membership (:mod:`.membership`, :mod:`.registry`), the directory of keys
(:mod:`.directory` over :mod:`.state`, :mod:`.keyspace`), repair (:mod:`.repair`), jobs
(:mod:`.jobs`, dispatched by :mod:`.jobrouter`), the requests it answers
(:mod:`.requests`), and :mod:`.service`, which wires them."""
