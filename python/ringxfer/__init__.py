"""ringxfer: large framed messages over io_uring, for asyncio.

    conn = await ringxfer.open_connection("127.0.0.1", 7878)
    await conn.send(header, numpy_array)          # one frame, two parts, no copy
    frame = await conn.recv()                     # a whole frame, pooled buffer
    arr = numpy.frombuffer(frame, dtype="f8")     # no copy either

See docs/python.md for the ownership rules, cancellation and errors.
"""

from .errors import BufferPoolExhausted, ConnectionClosed, ProtocolError, ShmError
from ._core import Frame
from ._stream import (DEFAULTS, Connection, Server, engine_info, open_connection,
                      start_server)
from ._version import __version__

__all__ = [
    "open_connection", "start_server", "Connection", "Server", "Frame",
    "ConnectionClosed", "ProtocolError", "BufferPoolExhausted", "ShmError", "DEFAULTS",
    "engine_info", "__version__",
]
