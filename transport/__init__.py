"""Wire format and sockets (ZeroMQ + msgpack). The only package that knows frames and sockets."""
