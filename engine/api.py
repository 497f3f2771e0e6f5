"""hetpipe's Python API: build a pipeline, hand it to a `Generator`, generate.

    from engine.api import Generator, connect_pipeline, local_pipeline

    with Generator(model_dir, local_pipeline(model_dir, "mlx:0-14,torch:15-29")) as gen:
        for piece in gen.stream("Why is the sky blue?", chat=True, max_tokens=64):
            print(piece.text, end="", flush=True)

    # stage daemons (`hetpipe stage ...`) on other machines: this process imports neither mlx nor torch
    with Generator(model_dir, connect_pipeline(model_dir, "tcp://mac:5555,tcp://linux:5555")) as gen: ...

The Generator owns its pipeline: closing it closes both.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from transport.auth import Auth
from transport.client import Client, RemoteStage
from transport.delivery import deliver
from transport.protocol import REPLY_TIMEOUT_S
from transport.remote_pipeline import RemotePipeline

from .compose.planner import StageCapacity, plan_layers
from .compose.specs import check_address, parse_local_spec, parse_stages_spec
from .compose.stages import import_backends, load_stage
from .core.config import ModelConfig
from .core.errors import HetpipeError, StageFailure, UserError
from .core.identity import config_hash, weights_hash
from .core.layer_cost import calibration_layer, layer_cost, relative_costs
from .core.partition import check_coverage
from .core.sampling import SamplingParams
from .core.tensors import DTYPES, check_dtype
from .serving.engine import EngineConfig
from .serving.generator import GenerationResult, Generator, Stream
from .serving.local_pipeline import LocalPipeline
from .serving.speculative import SpeculativeConfig

__all__ = ["EngineConfig", "GenerationResult", "Generator", "LocalPipeline", "RemotePipeline", "SamplingParams",
           "SpeculativeConfig", "StageFailure", "Stream", "UserError", "connect_pipeline", "load_stage",
           "local_pipeline"]


def local_pipeline(model_dir: str | Path, spec: str, dtype: str = "auto", device: str | None = None, *,
                   compile: bool = False, threads: int | None = None, kv_tokens: int | None = None) -> LocalPipeline:
    """In-process stages: `spec` is `mlx:0-14,torch:15-29`, or backends alone (`torch`, `mlx,torch`)
    for an even split. Every stage is loaded, warmed up and run on the pipeline's compute thread.
    `dtype` "auto": each backend's choice for its device and the checkpoint (`stages.resolve_dtype`)."""
    check_dtype(dtype, allow_auto=True)
    specs = parse_local_spec(spec, ModelConfig.load(model_dir).num_hidden_layers)
    backends = {s.backend for s in specs}
    if device and len(backends) > 1:
        raise UserError("a device applies to one backend; with mixed backends leave it out")
    loaders = [functools.partial(load_stage, s.backend, model_dir, s.first, s.last, device=device, dtype=dtype,
                                 threads=threads, kv_tokens=kv_tokens, compile=compile) for s in specs]
    return LocalPipeline(loaders, prepare=functools.partial(import_backends, backends))


def connect_pipeline(model_dir: str | Path, spec: str, *, timeout_s: float = REPLY_TIMEOUT_S,
                     auth_dir: str | Path | None = None, standby: Sequence[str] = (), log=print) -> RemotePipeline:
    """Stage daemons in pipeline order: `tcp://a:5555=0-14,tcp://b:5555=15-29`, or addresses alone
    for the planner to split by the speed and memory each daemon measured. Every stage is greeted
    (the model's identity checked), given its layers, and watched by heartbeat. `standby`: spare
    daemons that may take a lost stage's place. A daemon started without `--model` gets its layers'
    weights from this coordinator (`transport.delivery`), which then needs the weight files (not a
    framework)."""
    model_dir = str(model_dir)
    cfg = ModelConfig.load(model_dir)
    num_layers = cfg.num_hidden_layers
    entries = parse_stages_spec(spec)
    standby = [check_address(a) for a in standby]
    identity = {"config": config_hash(model_dir), "weights": weights_hash(model_dir)}
    client = Client(timeout_s, Auth.load(auth_dir, "coordinator"))
    try:
        stages = [RemoteStage(client, address, identity) for address, _ in entries]
        if entries[0][1] is not None:
            ranges = [layers for _, layers in entries]
            check_coverage(ranges, num_layers)
        else:
            dtype = next((s.report.dtype for s in stages if s.report.dtype in DTYPES), "bfloat16")
            # a daemon without the model has weighed no layer: the config's arithmetic stands in
            weight = int(layer_cost(cfg, calibration_layer(cfg), dtype).held)
            caps = [StageCapacity.of(s.report, layer_bytes=weight) for s in stages]
            plan = plan_layers(caps, num_layers, costs=relative_costs(cfg, dtype))
            log(plan.describe(caps))
            ranges = plan.ranges
        for i, (s, (first, last)) in enumerate(zip(stages, ranges)):
            if s.report.identity.get("source") == "delivered":
                if identity["weights"] is None:
                    raise UserError(f"stage {s.address} was started without a model, and this coordinator holds no "
                                    f"weights to send it (give it the directory, or start the daemon with --model)")
                deliver(client, s.address, model_dir, first, last, identity, log)
            s.load(first, last, stages[i + 1].address if i + 1 < len(stages) else None)
        return RemotePipeline(stages, identity, standby, model_dir=model_dir)
    except HetpipeError as e:  # setting up: a stage that refuses, fails or does not answer is the user's to fix
        client.close()
        raise e if isinstance(e, UserError) else UserError(str(e)) from None
    except BaseException:
        client.close()
        raise
