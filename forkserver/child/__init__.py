"""Everything a child runs, from the moment fork() returns 0 until os._exit().

``start`` lets go of the parent and leaves; ``limits`` applies rlimits, the
user drop and socket timeouts; ``stream`` serves one connection, ``datagram``
one datagram; ``spare`` waits for a connection before serving it;
``tcp_info`` reads the kernel's view of a TCP connection.
"""
