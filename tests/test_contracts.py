"""Every implementation of `Stage` and `Pipeline` has the protocol's methods with the protocol's
signatures (parameter names, kinds and defaults), and the protocol's attributes on real instances:
in-process stages of both backends, a stage daemon behind `RemoteStage`, and both pipelines."""

import inspect

import numpy as np
import pytest

from backends.mlx_stage import MLXStage
from backends.torch_stage import TorchStage
from engine.api import connect_pipeline, load_stage, local_pipeline
from engine.app.procs import start_stage, stop_stages
from engine.core.identity import config_hash
from engine.core.pipeline import Pipeline
from engine.core.sampling import SamplingParams
from engine.core.stage import SeqChunk, Stage, StageBatch, StageInfo
from engine.serving.local_pipeline import LocalPipeline
from transport.client import Client, RemoteStage
from transport.remote_pipeline import RemotePipeline

STAGES = [MLXStage, TorchStage, RemoteStage]
PIPELINES = [LocalPipeline, RemotePipeline]


def members(proto):
    """(methods, attributes) the protocol declares."""
    methods = {n: v for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}
    return methods, set(getattr(proto, "__annotations__", {}))


def shape(fn):
    """A signature without annotations: what a caller relies on."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("proto,impl", [(Stage, c) for c in STAGES] + [(Pipeline, c) for c in PIPELINES],
                         ids=lambda x: x.__name__)
def test_methods_have_the_protocols_signatures(proto, impl):
    methods, _ = members(proto)
    assert methods, proto
    for name, fn in methods.items():
        assert callable(getattr(impl, name, None)), f"{impl.__name__} lacks {name}"
        got = getattr(impl, name)
        assert shape(got) == shape(fn), f"{impl.__name__}.{name}{inspect.signature(got)}"


def check_attributes(obj, proto):
    _, attributes = members(proto)
    for name in attributes:
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {name}"
    assert isinstance(obj, proto)


@pytest.fixture(scope="module")
def daemon(tiny_dirs):
    proc, address = start_stage("torch", tiny_dirs["llama"], extra=["--layers", "0-3"])
    yield address
    stop_stages([proc])


def test_instances_have_the_protocols_attributes(tiny_dirs, daemon):
    d = tiny_dirs["llama"]
    for backend in ("mlx", "torch"):
        stage = load_stage(backend, d, 0, 3)
        check_attributes(stage, Stage)
        assert isinstance(stage.info, StageInfo)
    client = Client(10)
    remote = RemoteStage(client, daemon, identity={"config": config_hash(d)})
    check_attributes(remote, Stage)
    assert (remote.info.first, remote.info.last, remote.info.backend) == (0, 3, "torch")
    client.close()
    local = local_pipeline(d, "mlx:0-1,torch:2-3")
    check_attributes(local, Pipeline)
    assert local.max_inflight == 1 and [s.info.backend for s in local.stages] == ["mlx", "torch"]
    local.close()
    remote = connect_pipeline(d, f"{daemon}=0-3")
    check_attributes(remote, Pipeline)
    assert all(isinstance(s, RemoteStage) for s in remote.stages)
    remote.close()


def test_a_remote_stage_computes_what_an_in_process_one_does(tiny_dirs, daemon):
    d = tiny_dirs["llama"]
    local = load_stage("torch", d, 0, 3)
    client = Client(10)
    remote = RemoteStage(client, daemon, identity={"config": config_hash(d)})
    p = SamplingParams(logprobs=3)
    outs = []
    for stage in (local, remote):
        first = stage.forward(StageBatch([SeqChunk(5, 0, np.array([3, 1, 4, 1, 5], np.int32), p)])).tokens
        then = stage.forward(StageBatch([SeqChunk(5, 5, np.array([first[0].token_id], np.int32), p)])).tokens
        outs.append(first + then)
        assert stage.live_sequences() == [5] and stage.kv_tokens_used() == 6
        stage.release([5])
        assert stage.live_sequences() == []
    ranked = [[(t.token_id, [i for i, _ in t.top]) for t in out] for out in outs]
    assert ranked[0] == ranked[1]
    np.testing.assert_allclose([t.logprob for t in outs[0]], [t.logprob for t in outs[1]], atol=1e-6)
    client.close()
