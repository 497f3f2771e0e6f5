"""Wire format: a msgpack header, then raw array frames. Zero-copy on receive, never pickle.

    frames = [header, *arrays]     header = {"v": VERSION, "kind": ..., "req": ..., "client": ...,
                                             ..., "arrays": [[dtype, shape], ...]}

The envelope (`v`, `kind`, `req`, `client`) comes first, so a stage can name the request it
refuses even when the rest of the header is too large or broken (`peek_envelope`).
bfloat16 arrays travel as their 2-byte words with the dtype named in the header: never upcast.

A sequence's sampling parameters (a logit bias may hold a thousand entries) travel in full once:
later chunks of the same sequence send SAME_SAMPLING, and each stage keeps what it was sent
(`SamplingMemo`) until the sequence is released or starts afresh.
"""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np

from engine.core.errors import BatchTooLarge, UserError
from engine.core.kv_blocks import BLOCK
from engine.core.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_IDS, SamplingParams
from engine.core.stage import PromptLogprobs, SampledToken, SeqChunk, StageBatch, StageReport, StageResult
from engine.core.tensors import STORAGE, TypedArray
from engine.core.weight_store import TensorEntry, n_chunks

from . import protocol as P

_NP = {**STORAGE, "int32": np.int32, "uint8": np.uint8}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _NP.items()}
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias", "seed", "logprobs", "output_from", "min_tokens", "stop_ids")


class WireError(UserError):
    """A message that breaks the protocol; the daemon answers it with an error (kind `input`) and
    carries on."""


ENVELOPE = ("req", "client")  # packed right after v and kind


def pack(kind: str, arrays: list[tuple[str, np.ndarray]] = (), **fields) -> list:
    """Header + frames. `arrays` are (logical dtype, array) pairs."""
    header = {"v": P.VERSION, "kind": kind, **{k: fields.pop(k) for k in ENVELOPE if k in fields}, **fields,
              "arrays": [[dt, list(a.shape)] for dt, a in arrays]}
    return [msgpack.packb(header)] + [np.ascontiguousarray(a) for _, a in arrays]


def peek_envelope(frame) -> tuple[object, object]:
    """(req, client) of a header that may be too large or broken past its envelope: read without
    decoding the rest, so a refusal still reaches the right request. (None, None) if unreadable."""
    found = {}
    try:
        u = msgpack.Unpacker(max_buffer_size=len(_bytes(frame)) + 1, strict_map_key=True)
        u.feed(_bytes(frame))
        for _ in range(min(u.read_map_header(), 4)):
            key = u.unpack()
            if key not in ("v", "kind", *ENVELOPE):
                break
            found[key] = u.unpack()
    except Exception:
        pass
    req, client = found.get("req"), found.get("client")
    return (req if _is_int(req) else None), (client if isinstance(client, str) and len(client) < 256 else None)


def unpack(frames) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """Validate and decode; arrays are read-only views on the received frames."""
    if not frames:
        raise WireError("empty message")
    raw = _bytes(frames[0])
    if len(raw) > P.MAX_HEADER_BYTES:
        raise WireError("header too large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception:
        raise WireError("header is not valid msgpack") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    if header.get("v") != P.VERSION:
        raise WireError(f"protocol version {header.get('v')!r}, expected {P.VERSION}")
    if header.get("kind") not in P.KINDS:
        raise WireError(f"unknown message kind {header.get('kind')!r}")
    specs = header.get("arrays", [])
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise WireError(f"header names {len(specs) if isinstance(specs, list) else '?'} arrays, "
                        f"message has {len(frames) - 1}")
    arrays = []
    for spec, frame in zip(specs, frames[1:]):
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in P.ARRAY_DTYPES
                and isinstance(spec[1], list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in spec[1])):
            raise WireError(f"bad array spec {spec!r}")
        dtype, shape = spec
        buf = _buffer(frame)
        if len(buf) > P.MAX_FRAME_BYTES:
            raise WireError("array frame too large")
        want = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: no overflow, and 20x cheaper than np.prod
        if want != len(buf):
            raise WireError(f"array of shape {shape} {dtype} needs {want} bytes, frame has {len(buf)}")
        arrays.append((dtype, np.frombuffer(buf, dtype=_NP[dtype]).reshape(shape)))
    return header, arrays


def _bytes(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


# -- batches and results -------------------------------------------------------------------------

SAME_SAMPLING = 1  # a seq entry's sampling field: "as sent for this sequence before"


class SamplingMemo:
    """The sampling parameters each live sequence was last sent with, on either end of a link: the
    sender to know what it may send as SAME_SAMPLING, a stage to resolve it."""

    def __init__(self):
        self.params: dict[int, SamplingParams] = {}

    def forget(self, seq_ids) -> None:
        for sid in seq_ids:
            self.params.pop(sid, None)

    def keep_only(self, seq_ids) -> None:
        """Drop every sequence not in `seq_ids` (the stage's live ones): bounds what a stage keeps
        for coordinators that went away without releasing."""
        live = set(seq_ids)
        self.params = {k: v for k, v in self.params.items() if k in live}


def pack_batch(batch: StageBatch, memo: SamplingMemo | None = None, **fields) -> list:
    """Frames: the token ids, the hidden rows (past the first stage), and the allowed-token masks of
    the sequences that have one (structured output), one row each; a seq entry names its mask row.
    With `memo`, sampling parameters already sent for a sequence go as SAME_SAMPLING. A header past
    the stages' limit raises `BatchTooLarge` (nothing is sent: the caller splits the batch)."""
    limit = P.MAX_HEADER_BYTES - P.HEADER_MARGIN
    estimate = _header_estimate(batch, memo)
    if estimate > limit:  # refused before anything is packed: a split retries at once
        raise BatchTooLarge(f"a batch of {len(batch.seqs)} sequences needs about {estimate} header bytes "
                            f"(limit {limit})")
    masks, seqs = [], []  # a verified draft's mask rows are consecutive; its entry names the first
    for s in batch.seqs:
        first = None if s.allowed is None else len(masks)
        if s.allowed is not None:
            masks.extend(s.allowed if s.draft else [s.allowed])
        seqs.append([s.seq_id, s.offset, len(s.token_ids), _sampling_entry(s, memo), first, list(s.prefix),
                     list(s.names), s.prompt_logprobs, s.draft])
    ids = [s.token_ids for s in batch.seqs]
    tokens = np.asarray(ids[0] if len(ids) == 1 else np.concatenate(ids), np.int32)
    arrays = [("int32", tokens)]
    if batch.hidden is not None:
        arrays.append((batch.hidden.dtype, batch.hidden.data))
    if masks:
        arrays.append(("int32", np.stack(masks).astype(np.int32, copy=False)))
    frames = pack(P.FORWARD, arrays, seqs=seqs, masks=len(masks), evict=list(batch.evict), **fields)
    if len(frames[0]) > limit:
        if memo is not None:  # nothing was sent: what this call marked as sent was not
            memo.forget(s.seq_id for s, entry in zip(batch.seqs, seqs) if isinstance(entry[3], dict))
        raise BatchTooLarge(f"a batch of {len(seqs)} sequences has a {len(frames[0])}-byte header (limit {limit})")
    return frames


def _sent_before(s, memo: SamplingMemo | None) -> bool:
    """Whether `s`'s sampling parameters may go as SAME_SAMPLING (a sequence's first chunk starts it
    afresh on every stage: sent in full)."""
    return memo is not None and s.offset != len(s.prefix) * BLOCK and memo.params.get(s.seq_id) is s.sampling


def _sampling_entry(s, memo: SamplingMemo | None):
    if s.sampling is None:
        return None
    if _sent_before(s, memo):
        return SAME_SAMPLING
    if memo is not None:
        memo.params[s.seq_id] = s.sampling
    return _pack_sampling(s.sampling)


def _header_estimate(batch: StageBatch, memo: SamplingMemo | None) -> int:
    """An upper estimate of a batch's header bytes, without packing it: ~48 per entry, 9 per block
    hash, and ~200 plus 15 per logit-bias entry for parameters sent in full."""
    n = 9 * len(batch.evict)
    for s in batch.seqs:
        n += 48 + 9 * (len(s.prefix) + len(s.names))
        if s.sampling is not None and not _sent_before(s, memo):
            n += 200 + 15 * len(s.sampling.logit_bias) + 10 * len(s.sampling.stop_ids)
    return n


def forward_frames(header: dict, arrays, hidden: TypedArray, **fields) -> list:
    """The frames that pass a batch on to the next stage: its seq entries, masks and evictions as
    they came (SAME_SAMPLING stays SAME_SAMPLING), the token frame, and this stage's hidden rows."""
    keep = {k: header[k] for k in ("seqs", "masks", "evict")}
    out = [arrays[0], (hidden.dtype, hidden.data)]
    if header.get("masks"):
        out.append(arrays[-1])
    return pack(P.FORWARD, out, **keep, **fields)


def _pack_sampling(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in _SAMPLING_FIELDS}  # the logit bias's tuples pack as arrays, uncopied


def unpack_batch(header: dict, arrays, memo: SamplingMemo | None = None) -> StageBatch:
    seqs, n_masks, evict = header.get("seqs"), header.get("masks", 0), header.get("evict", [])
    if not isinstance(seqs, list) or not 0 < len(seqs) <= P.MAX_SEQS_PER_CALL:
        raise WireError("forward needs a non-empty list of seqs")
    if not _hashes(evict):
        raise WireError("evict must be a list of block hashes")
    if not (_is_int(n_masks) and 0 <= n_masks <= len(seqs) * (P.MAX_DRAFT + 1)):  # a draft has a row per position
        raise WireError("bad mask count")
    masks = None
    if n_masks:
        if len(arrays) < 2 or arrays[-1][0] != "int32" or arrays[-1][1].ndim != 2 or len(arrays[-1][1]) != n_masks:
            raise WireError(f"forward names {n_masks} masks but has no (masks, words) int32 frame for them")
        masks, arrays = arrays[-1][1], arrays[:-1]
    if not 1 <= len(arrays) <= 2 or arrays[0][0] != "int32" or arrays[0][1].ndim != 1:
        raise WireError("forward needs an int32 token frame and at most one hidden frame")
    tokens = arrays[0][1]
    out, at, used, params, fresh = [], 0, set(), {}, []
    for s in seqs:
        if not (isinstance(s, list) and len(s) == 9 and all(_is_int(x) for x in s[:3])
                and 0 <= s[0] <= P.MAX_SEQ_ID and 0 <= s[1] < 2**31 and 0 < s[2] <= len(tokens) - at
                and _is_int(s[8]) and 0 <= s[8] <= min(P.MAX_DRAFT, s[2] - 1)
                and (s[4] is None or (_is_int(s[4]) and 0 <= s[4] <= n_masks - s[8] - 1
                                      and not used & set(range(s[4], s[4] + s[8] + 1))))
                and _hashes(s[5]) and _hashes(s[6])
                and (s[7] is None or (_is_int(s[7]) and 0 <= s[7] <= MAX_LOGPROBS))):
            raise WireError(f"bad seq entry {str(s)[:80]}")
        sampling = None
        if s[3] == SAME_SAMPLING and not isinstance(s[3], bool):
            sampling = params.get(s[0]) or (memo.params.get(s[0]) if memo is not None else None)
            if sampling is None:
                raise WireError(f"sequence {s[0]}: its sampling parameters were never sent")
        elif s[3] is not None:
            params[s[0]] = sampling = _sampling(s[3])
        elif s[1] == len(s[5]) * BLOCK:
            fresh.append(s[0])  # a sequence starting afresh: what it was sent in an earlier life is stale
        allowed = None if s[4] is None else masks[s[4] : s[4] + s[8] + 1] if s[8] else masks[s[4]]
        if allowed is not None:
            used.update(range(s[4], s[4] + s[8] + 1))
            if sampling is None:
                raise WireError("a mask on a sequence that samples nothing")
        if s[8] and (sampling is None or s[7] is not None):
            raise WireError("drafts on a sequence that samples nothing, or whose prompt is scored")
        out.append(SeqChunk(s[0], s[1], tokens[at : at + s[2]], sampling, allowed, s[5], s[6], s[7], s[8]))
        at += s[2]
    if at != len(tokens):
        raise WireError(f"seqs count {at} tokens, token frame has {len(tokens)}")
    if len(used) != n_masks:
        raise WireError(f"{n_masks} mask rows sent, {len(used)} named")
    hidden = None
    if len(arrays) == 2:
        dtype, data = arrays[1]
        if dtype in ("int32", "uint8") or data.ndim != 2 or data.shape[0] != at:
            raise WireError("hidden frame must be (tokens, hidden_size) floats")
        hidden = TypedArray(data, dtype)
    if memo is not None:  # only a batch read whole changes what the stage keeps
        memo.forget(fresh)
        memo.params.update(params)
    return StageBatch(out, hidden, evict)


def _hashes(v) -> bool:
    return (isinstance(v, list) and len(v) <= P.MAX_BLOCK_HASHES
            and all(_is_int(h) and 0 <= h <= P.MAX_BLOCK_HASH for h in v))


def _sampling(d) -> SamplingParams:
    if not isinstance(d, dict) or set(d) - set(_SAMPLING_FIELDS):
        raise WireError("bad sampling params")
    for k, v in d.items():
        if k in ("top_k", "logprobs", "output_from", "min_tokens"):
            ok = _is_int(v)
        elif k == "stop_ids":  # checked by SamplingParams
            ok = isinstance(v, list) and len(v) <= MAX_STOP_IDS
        elif k == "logit_bias":  # its entries are checked by SamplingParams, once
            ok = isinstance(v, list) and len(v) <= MAX_LOGIT_BIAS
        elif k == "seed":
            ok = v is None or (_is_int(v) and 0 <= v < 2**63)
        else:
            ok = _is_number(v)
        if not ok:
            raise WireError(f"bad sampling param {k}")
    try:
        return SamplingParams(**d)
    except Exception as e:
        raise WireError(f"bad sampling params: {e}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def pack_result(result: StageResult, **fields) -> list:
    """Sampled tokens in the header; hidden rows (all stages but the last) or, where a prompt was
    scored, three frames: every scored token's log-probability, its alternatives' ids and theirs
    (`prompt` names each sequence's rows: [seq_id, start, n, k])."""
    tokens = [[t.seq_id, t.token_id, t.logprob, [list(p) for p in t.top], t.error] for t in result.tokens]
    arrays = [] if result.hidden is None else [(result.hidden.dtype, result.hidden.data)]
    if result.prompt_logprobs:
        scored = result.prompt_logprobs
        fields["prompt"] = [[p.seq_id, p.start, len(p.logprobs), p.top_ids.shape[1]] for p in scored]
        width = max(p.top_ids.shape[1] for p in scored)
        arrays = [("float32", np.concatenate([p.logprobs for p in scored])),
                  ("int32", np.concatenate([_widen(p.top_ids, width, 0) for p in scored])),
                  ("float32", np.concatenate([_widen(p.top_logprobs, width, np.nan) for p in scored]))]
    return pack(P.RESULT, arrays, tokens=tokens, **fields)


def _widen(a: np.ndarray, width: int, fill) -> np.ndarray:
    return a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)


def unpack_result(header: dict, arrays) -> StageResult:
    tokens = header.get("tokens", [])
    if not (isinstance(tokens, list) and all(isinstance(t, list) and len(t) == 5 for t in tokens)):
        raise WireError("a result's tokens must be [seq_id, token_id, logprob, top, error] entries")
    try:
        out = [SampledToken(int(s), int(t), float(lp), [(int(a), float(b)) for a, b in top],
                            None if err is None else str(err)[:500]) for s, t, lp, top, err in tokens]
    except (TypeError, ValueError):
        raise WireError("a result's token entry is malformed") from None
    prompt = header.get("prompt")
    if prompt is not None:
        return StageResult(None, out, _unpack_scores(prompt, arrays))
    hidden = TypedArray(arrays[0][1], arrays[0][0]) if arrays else None
    return StageResult(hidden, out)


def _unpack_scores(prompt, arrays) -> list[PromptLogprobs]:
    if not (isinstance(prompt, list) and len(prompt) <= P.MAX_SEQS_PER_CALL and len(arrays) == 3
            and all(isinstance(p, list) and len(p) == 4 and all(_is_int(x) and x >= 0 for x in p) for p in prompt)):
        raise WireError("a result's prompt scores must be [seq_id, start, n, k] entries and three frames")
    (d1, lps), (d2, ids), (d3, tops) = arrays
    total = sum(p[2] for p in prompt)
    width = max((p[3] for p in prompt), default=0)
    if not (d1 == "float32" and d2 == "int32" and d3 == "float32" and lps.shape == (total,)
            and ids.shape == (total, width) and tops.shape == (total, width)):
        raise WireError("a result's prompt score frames do not match its entries")
    out, at = [], 0
    for seq_id, start, n, k in prompt:
        out.append(PromptLogprobs(seq_id, start, lps[at : at + n], ids[at : at + n, :k], tops[at : at + n, :k]))
        at += n
    return out


# -- what a stage says about itself ---------------------------------------------------------------

def _opt(check):
    return lambda v: v is None or check(v)


def _int_list(v) -> bool:
    return isinstance(v, list) and len(v) <= P.MAX_SEQS_PER_CALL * 16 and all(_is_int(x) for x in v)


def _str(v) -> bool:
    return isinstance(v, str) and len(v) < 4096


_REPORT_CHECKS = {
    "address": _str, "heartbeat": _str, "backend": _str, "device": _str, "dtype": _str,
    "num_layers": _is_int,
    "layers": _opt(lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)),
    "kv_tokens": _is_int, "kv_tokens_used": _is_int, "kv_tokens_cached": _is_int, "live_sequences": _int_list, "max_seqs": _opt(_is_int),
    "draining": lambda v: isinstance(v, bool),
    "identity": lambda v: isinstance(v, dict) and all(_str(k) and (x is None or _str(x)) for k, x in v.items()),
    "ms_per_layer": _is_number, "head_ms": _is_number, "layer_bytes": _is_int, "free_memory": _is_int,
    "resident_bytes": _is_int, "forward_ms": _opt(_is_number),
}
assert set(_REPORT_CHECKS) == {f.name for f in dataclasses.fields(StageReport)}, "a StageReport field unchecked"


def pack_report(report: StageReport) -> dict:
    d = dataclasses.asdict(report)
    d["layers"] = None if report.layers is None else list(report.layers)  # as msgpack hands it back
    return d


def unpack_report(d) -> StageReport:
    """A `StageReport` from its wire form, every field checked: a bad one is a WireError."""
    if not isinstance(d, dict) or set(d) != set(_REPORT_CHECKS):
        raise WireError("a stage report must have exactly the StageReport fields")
    for name, ok in _REPORT_CHECKS.items():
        if not ok(d[name]):
            raise WireError(f"bad stage report field {name}: {str(d[name])[:60]}")
    d = dict(d)
    if d["layers"] is not None:
        d["layers"] = tuple(d["layers"])
    return StageReport(**d)


# -- weight delivery's manifest entries (MODEL) -------------------------------------------------

def pack_tensor_entry(e: TensorEntry) -> list:
    return [e.name, e.dtype, e.shape, e.nbytes, e.chunks]


def unpack_tensor_entry(v) -> TensorEntry:
    """A MODEL message's tensor entry, checked (a bad one is a WireError)."""
    if not (isinstance(v, list) and len(v) == 5 and isinstance(v[0], str) and 0 < len(v[0]) < 512
            and isinstance(v[1], str) and len(v[1]) < 16 and isinstance(v[2], list) and len(v[2]) < 8
            and all(_is_int(d) and d >= 0 for d in v[2]) and _is_int(v[3]) and v[3] >= 0
            and isinstance(v[4], list) and len(v[4]) == n_chunks(v[3])
            and all(isinstance(h, bytes) and len(h) == 32 for h in v[4])):
        raise WireError(f"bad tensor entry {str(v)[:80]}")
    if "/" in v[0] or v[0].startswith("."):
        raise WireError(f"bad tensor name {v[0][:80]!r}")
    return TensorEntry(*v)
