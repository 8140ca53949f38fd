"""I/O shells of meshpipe: processes, sockets, shared-memory queues, clocks.

Installed as ``meshpipe_workers``. Everything protocol-related is delegated to the
sans-IO core in ``meshpipe``.
"""
