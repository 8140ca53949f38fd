"""MSP, the Mesh Streaming Protocol: streams multiplexed inside end-to-end sessions.

Three modes (:class:`Mode`): RELIABLE (in order, exactly once, SACK, Veno congestion
control, flow control), DEADLINE (in order, retransmits only while a segment can
still make its deadline, then skips and reports the lost byte range) and DATAGRAM
(unordered, unreliable, fragmented to the path MTU). See wire.py for the segment
layouts, stream.py for the per-stream state machine, endpoint.py for the multiplexer.
"""

from meshpipe.msp.buffers import Gap, Reassembly, SendBuffer
from meshpipe.msp.endpoint import (
    Msp,
    MspEvent,
    MspParams,
    StreamAccepted,
    StreamClosed,
    StreamEof,
    StreamEstablished,
    StreamGap,
    StreamReadable,
    StreamRefused,
    StreamWritable,
)
from meshpipe.msp.stream import MessageTooLarge, State, Stream, StreamError, StreamId
from meshpipe.msp.wire import (
    DATAPLANE_SPACE,
    PROTO_MSP,
    Mode,
    ResetCode,
    in_dataplane,
    stream_number,
)

__all__ = [
    "DATAPLANE_SPACE",
    "PROTO_MSP",
    "Gap",
    "MessageTooLarge",
    "Mode",
    "Msp",
    "MspEvent",
    "MspParams",
    "Reassembly",
    "ResetCode",
    "SendBuffer",
    "State",
    "Stream",
    "StreamAccepted",
    "StreamClosed",
    "StreamEof",
    "StreamError",
    "StreamEstablished",
    "StreamGap",
    "StreamId",
    "StreamReadable",
    "StreamRefused",
    "StreamWritable",
    "in_dataplane",
    "stream_number",
]
