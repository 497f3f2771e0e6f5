"""Protocol constants: every message kind, limit and version lives here, once."""

from engine.core.stage import MAX_DRAFT  # noqa: F401  (draft tokens one chunk may carry to be verified)

VERSION = 9  # a daemon and a coordinator of other versions refuse each other's messages

# message kinds, client -> stage
HELLO = "hello"  # identity check; reply: INFO
LOAD = "load"  # assign a layer range and the next hop; reply: INFO
FORWARD = "forward"  # run a batch; reply (or pass on along `route`): RESULT
RELEASE = "release"  # free sequences; reply: OK
MODEL = "model"  # a daemon without --model: the model's identity, config and a stage's tensors; reply: OK `have`
CHUNK = "chunk"  # bytes of one of those tensors at an offset (one uint8 frame); reply: OK `held` (and `error`)
PING = "ping"  # reply: INFO
HEALTH = "health"  # a real one-token forward; reply: INFO with forward_ms
DRAFT = "draft"  # a draft model's turn (`BaseStage.draft`): seq_id, start, k, an int32 frame; reply: OK `tokens`
# stage -> client
INFO = "info"
RESULT = "result"
OK = "ok"
ERROR = "error"

KINDS = {HELLO, LOAD, FORWARD, RELEASE, MODEL, CHUNK, PING, HEALTH, DRAFT, INFO, RESULT, OK, ERROR}
# bfloat16 travels as uint16 words; uint8 frames are weight bytes (CHUNK)
ARRAY_DTYPES = {"int32", "float32", "float16", "bfloat16", "uint8"}

MAX_HEADER_BYTES = 1 << 20
HEADER_MARGIN = 1 << 14  # a coordinator's batch header stays this far under the limit: each stage adds its timing
MAX_FRAME_BYTES = 1 << 28  # also the socket's ZMQ_MAXMSGSIZE: a larger message drops the sender
MAX_SEQS_PER_CALL = 4096
MAX_ROUTE = 64  # stages after this one
MAX_SEQ_ID = (1 << 63) - 1
MAX_BLOCK_HASHES = 1 << 16  # block hashes in one seq entry's prefix or names, or in a batch's evictions
MAX_BLOCK_HASH = (1 << 63) - 1

HEARTBEAT_S = 0.4  # the coordinator pings every stage's heartbeat socket this often while serving
DEAD_AFTER_S = 1.5  # no answer for this long: the stage is lost (killed, stopped, unreachable)
NEXT_HOP_WAIT_MS = 2000  # a stage waits this long for a connection to the next stage before failing the batch
DRAIN_TIMEOUT_S = 30.0  # after SIGTERM, how long live sequences may keep a daemon up
REPLY_TIMEOUT_S = 120.0  # a forward of a long prefill on a slow stage stays well under this
DRAFT_TIMEOUT_S = 10.0  # a draft model's turn: the engine waits this long, then goes on without drafts
HELLO_TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 600.0  # a cold torch.compile of many layers on a small CPU
DELIVERY_WINDOW = 8  # weight chunks in flight to one daemon
DELIVERY_TRIES = 3  # times a tensor whose bytes failed their hash is sent again
