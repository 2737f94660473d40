"""Transport: the only code that knows about the wire (ZeroMQ sockets, gRPC servers and clients).

Library objects import nothing of it but `config` (ports, the token's name and the bind rule: no wire
library); services wire them to sockets through the rest.
"""
