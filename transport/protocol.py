"""Protocol constants: every message kind, limit and version lives here, once."""

VERSION = 1

# message kinds, client -> stage
HELLO = "hello"  # identity check; reply: INFO
LOAD = "load"  # assign a layer range; reply: INFO
FORWARD = "forward"  # run a batch; reply (or pass on along `route`): RESULT
RELEASE = "release"  # free sequences; reply: OK
PING = "ping"  # reply: INFO
# stage -> client
INFO = "info"
RESULT = "result"
OK = "ok"
ERROR = "error"

KINDS = {HELLO, LOAD, FORWARD, RELEASE, PING, INFO, RESULT, OK, ERROR}
ARRAY_DTYPES = {"int32", "float32", "float16", "bfloat16"}  # bfloat16 travels as uint16 words

MAX_HEADER_BYTES = 1 << 20
MAX_FRAME_BYTES = 1 << 30
MAX_SEQS_PER_CALL = 4096

REPLY_TIMEOUT_S = 120.0  # a forward of a long prefill on a slow stage stays well under this
LOAD_TIMEOUT_S = 600.0
