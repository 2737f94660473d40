"""Transport: the only code that knows about the wire (ZeroMQ sockets, gRPC servers and clients).

Library objects never import this package; services wire them to sockets through it.
"""
