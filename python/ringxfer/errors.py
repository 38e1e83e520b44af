"""The exceptions ringxfer raises.

Each subclasses the builtin a caller already catches: a clean close between
frames is an ``EOFError``; a broken stream (a close inside a frame, a bad
header, an oversize frame, a checksum mismatch) is a ``ConnectionError``.
Transport failures keep the builtin ``OSError`` subclasses the errno picks
(``ConnectionResetError``, ``BrokenPipeError``, ...); a connection closed
locally raises ``ConnectionAbortedError``.
"""

__all__ = ["ConnectionClosed", "ProtocolError", "BufferPoolExhausted", "ShmError"]


class ConnectionClosed(EOFError):
    """The peer closed the connection cleanly, between two frames."""


class ProtocolError(ConnectionError):
    """The byte stream broke the wire format (docs/protocol.md).

    ``cause`` names the rule: ``truncated`` (closed inside a frame),
    ``bad_magic``, ``bad_version``, ``unknown_flags``, ``reserved_not_zero``,
    ``too_large`` (above ``max_frame``), ``checksum_mismatch``,
    ``too_many_empty``, ``no_buffer``, or ``shm_protocol`` (an shm peer broke
    the shared-memory protocol: a forged descriptor, a bad handshake; the
    message says what it sent). The connection is closed.
    """

    def __init__(self, message, cause):
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):
        return (type(self), (str(self), self.cause))


class BufferPoolExhausted(ProtocolError, MemoryError):
    """The buffer pool's budget is used up by frames this process still holds.

    Raised by ``Connection.allocate()``, and by ``recv()`` when a frame could
    not be given a buffer (that connection is then closed: its stream cannot
    be resumed in the middle of a frame). Release frames sooner, or raise
    ``pool_budget``.
    """


class ShmError(OSError):
    """The shared-memory transport cannot be used as asked (an ``OSError``
    with the errno): ``EOPNOTSUPP`` where the engine runs on epoll (io_uring
    blocked, or ``backend="epoll"``), ``EPROTOTYPE`` when a path is not the
    kind of socket the transport needs (a ``transport="shm"`` connection to a
    Unix stream server, or the reverse). The message says what to use."""
