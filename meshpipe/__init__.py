"""meshpipe: a mesh-overlay node whose addresses are public keys.

The modules in this package are the sans-IO protocol core: they take bytes and
the current time and return actions and deadlines. Sockets, clocks, processes and
queues live in ``meshpipe_workers`` (the repository's ``workers/`` folder).
"""

__version__ = "0.1.0"
