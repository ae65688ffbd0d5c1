"""What the picker reads from Envoy's ext_proc messages (request heads, REST and gRPC bodies, tensors) and
writes back (the answer's headers and refusals). Plain Python over bytes and strings: the protobuf stream
itself is :mod:`extproc.handlers.server`'s."""
