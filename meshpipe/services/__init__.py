"""Services: the sans-IO pieces that run over MSP streams.

``acl`` (who may use a service), ``socks5`` (RFC 1928 server-side codec),
``exit_policy`` (where an exit may connect), ``proxy_wire`` (the request a SOCKS
client node sends to its exit) and ``discovery`` (signed service records flooded
through the mesh). None of them opens a socket or reads a clock.
"""
