"""The PyTorch stage: a `Stage` whose layers run in torch on cuda, mps or cpu."""

from __future__ import annotations

import importlib
import mmap
import platform
import time

import numpy as np
import torch

from engine.core.base_stage import PROBE_BYTES, WARMUP_ID, BaseStage, Layout
from engine.core.sampling import SamplingParams
from engine.core.config import ModelConfig, rope_inv_freq
from engine.core.errors import UserError
from engine.core.stage import SeqChunk, StageBatch, StageInfo
from engine.core.quant import QuantTensor
from engine.core.tensors import TypedArray
from engine.core.weights import load_stage_tensors

from . import native
from .cache import PagedKV

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def to_torch(a, dtype: torch.dtype, device, copy: bool = True) -> torch.Tensor:
    """A typed numpy array to a torch tensor of `dtype`; bfloat16 words are viewed, not converted.
    `copy=False`: a writable array is used in place (a weight loaded for the stage alone; its
    memory is then held once, not twice); a read-only one is always copied."""
    data = np.array(a.data) if copy or not a.data.flags.writeable else a.data
    t = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16) if a.dtype == "bfloat16" else torch.from_numpy(data)
    return t.to(device=device, dtype=dtype)


def to_hidden(x: torch.Tensor, dtype: str) -> TypedArray:
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return TypedArray(x.view(torch.int16).numpy().view(np.uint16), dtype)
    return TypedArray(x.numpy(), dtype)


HUGE_PAGE = 2 << 20


def huge_page_weights(model: torch.nn.Module) -> None:
    """Move a CPU model's weights into 2 MiB-aligned blocks marked for transparent huge pages.

    Decode streams every weight once per token; with 4 KiB pages the hardware prefetchers stop at
    every page boundary and the TLB misses every 4 KiB. One block per layer (and one for what lies
    outside the layers), so the move holds at most one layer's copy at a time. Tied tensors stay
    tied. Where the kernel gives no huge pages (THP off, not Linux) the blocks are plain memory.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    layers = list(getattr(model, "layers", []))
    tensors = lambda m: [*m.parameters(), *m.buffers()]  # noqa: E731  (quantized codes are buffers)
    inner = {id(p) for layer in layers for p in tensors(layer)}
    groups = [tensors(layer) for layer in layers]
    groups.append([p for p in tensors(model) if id(p) not in inner])
    for params in groups:
        unique = {p.data_ptr(): p.data for p in params if p.device.type == "cpu"}
        if not unique:
            continue
        sizes = {ptr: -(-t.numel() * t.element_size() // 64) * 64 for ptr, t in unique.items()}
        mm = mmap.mmap(-1, sum(sizes.values()) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
        block = torch.frombuffer(mm, dtype=torch.uint8)  # keeps `mm` alive
        off = -block.data_ptr() % HUGE_PAGE
        moved = {}
        for ptr, t in unique.items():
            view = block[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            moved[ptr] = view.copy_(t)
            off += sizes[ptr]
        for p in params:
            if p.data_ptr() in moved:
                p.data = moved[p.data_ptr()]


class TorchStage(BaseStage):
    def __init__(self, model_dir, cfg: ModelConfig, first: int, last: int, device: str, dtype: str):
        super().__init__(StageInfo("torch", device, dtype, first, last, cfg.num_hidden_layers), cfg)
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[dtype]
        raw = load_stage_tensors(model_dir, cfg, first, last)
        # quantized weights stay QuantTensors: the model re-lays them for this host's kernels (quant.py)
        weights = {name: t if isinstance(t, QuantTensor) else to_torch(t, self.dtype, self.device, copy=False)
                   for name, t in raw.items()}
        # gemma3's windowed layers have a RoPE base of their own
        inv_freq = {local: torch.from_numpy(rope_inv_freq(cfg, local)).to(self.device) for local in (False, True)
                    if local is False or cfg.local_rope_theta is not None}
        model_cls = importlib.import_module(f"{__package__}.models.{cfg.family}").StageModel
        self.model = model_cls(cfg, weights, first, last, inv_freq).eval()
        del weights
        if self.device.type == "cpu":
            huge_page_weights(self.model)
            if native.load() is None:  # our CPU kernels, where this CPU runs them (else torch's)
                self.kernels = native.running()
        self.decode_model = self.model  # what runs steps of one-token rows: compiled with --compile
        self.windows = cfg.windows(first, last)
        self.kv = PagedKV(last - first + 1, cfg.num_key_value_heads, cfg.head_dim, self.dtype, self.device)
        self.blocks = self.kv.blocks

    def compile_decode(self) -> None:
        """torch.compile the decode steps: inductor fuses the small ops within and across layers,
        which are most of an eager step's time past the weight reads (the whole stage compiles as
        one graph: compiling one layer for all of them fuses nothing across layers). Prefill stays
        eager: its time is the GEMMs, and each prompt length would be a shape to compile (minutes
        for a first request of a new length). Dynamic shapes: one graph serves every batch size
        from 2 and every cache length; the warm-up compiles it and the one-row graph. On a CPU the
        graph's calls between kernels run from C++ (cpp_wrapper): a faster step for a longer first
        compile. Figures: docs/benchmarks.md."""
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        self.decode_model = torch.compile(self.model, dynamic=True, options=options)

    def warmup(self, decode_only: bool = False) -> None:
        super().warmup(decode_only)
        if self.decode_model is not self.model and not decode_only:
            self._warm_two_rows()

    def _warm_two_rows(self) -> None:
        """A decode step of two sequences of different lengths: the compiled graph for batches."""
        sids, lengths = (WARMUP_ID, WARMUP_ID + 1), (3, 5)
        for sid, n in zip(sids, lengths):
            self.forward(StageBatch([SeqChunk(sid, 0, np.zeros(n, np.int32), SamplingParams())],
                                    self._zeros(n)))
        self.forward(StageBatch([SeqChunk(sid, n, np.zeros(1, np.int32), SamplingParams())
                                 for sid, n in zip(sids, lengths)], self._zeros(2)))
        self.release(list(sids))

    def _zeros(self, n: int) -> TypedArray | None:
        if self.info.is_first:
            return None
        return TypedArray.from_float32(np.zeros((n, self.hidden_size), np.float32), self.info.dtype)

    def free_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return super().free_memory()

    def total_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[1]
        return super().total_memory()

    @torch.inference_mode()
    def read_bandwidth(self) -> float:
        a = torch.ones(PROBE_BYTES // 4, dtype=torch.float32, device=self.device)
        best = float("inf")
        for _ in range(5):
            _sync(self.device)
            t = time.perf_counter()
            a.sum()
            _sync(self.device)
            best = min(best, time.perf_counter() - t)
        return PROBE_BYTES / best

    @torch.inference_mode()
    def _compute(self, seqs: list[SeqChunk], hidden: TypedArray | None):
        lay = Layout.of(seqs)
        if hidden is None:
            x = torch.from_numpy(np.concatenate([s.token_ids for s in seqs]).astype(np.int64)).to(self.device)
        else:
            x = to_torch(hidden, self.dtype, self.device)
        pos = torch.from_numpy(lay.positions).to(self.device)
        plans = self.kv.plan([s.seq_id for s in seqs], lay.starts, lay.lengths, lay.offsets, self.windows)
        rows = torch.from_numpy(lay.sample_rows).to(self.device)
        model = self.decode_model if plans[None if None in plans else self.windows[0]].all_decode else self.model
        out = model(x, pos, plans, self.kv, rows)
        if self.info.is_last:
            return out.cpu().numpy()
        return to_hidden(out, self.info.dtype)



def auto_dtype(device: str | None, checkpoint: str) -> str:
    """`--dtype auto` on torch: the checkpoint's own dtype where the device computes it natively (a
    CUDA GPU: bf16 where it has bf16, else fp16 for a half checkpoint; Apple's MPS: fp16), bf16 on a
    CPU with bf16 arithmetic (AVX512-BF16 or AMX), float32 on other CPUs (their half GEMMs are slow)."""
    device = device or default_device()
    if checkpoint == "float32":
        return "float32"
    if device.startswith("cuda"):
        return "bfloat16" if checkpoint == "bfloat16" and torch.cuda.is_bf16_supported() else "float16"
    if device.startswith("mps"):
        return "float16"
    return "float32" if native.lacks_half_gemm() or platform.machine() != "x86_64" else "bfloat16"


def create_stage(model_dir, cfg: ModelConfig, first: int, last: int, *, device=None, dtype="float32",
                 threads=None, compile: bool = False) -> TorchStage:
    if threads:
        torch.set_num_threads(threads)
    device = device or default_device()
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"torch device {device!r} is not usable here: {str(e).splitlines()[0]}") from None
    stage = TorchStage(model_dir, cfg, first, last, device, dtype)
    if compile:
        stage.compile_decode()
    stage.warmup()
    return stage
