"""A worker: the store (:mod:`.store`) and its storage server (:mod:`.storage`), the link
to the master (:mod:`.link`) and its orders (:mod:`.orders`), task slots (:mod:`.tasks`,
driven by :mod:`.runner`), and :mod:`.service`, which wires them."""
