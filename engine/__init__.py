"""hetpipe's framework-neutral engine: numpy, token ids and dataclasses; imports neither mlx nor torch.

    engine/core/      the contract and the model description: stage and pipeline protocols, shared
                      types, config, weights, sampling. Imports nothing else of hetpipe's.
    engine/serving/   running requests: scheduler, engine loop, in-process pipeline, generator, text.
    engine/app/       the application layer: CLI, demo, bench suites, fetch and GGUF import, processes.
    engine/api.py     the public Python API (`local_pipeline`, `connect_pipeline`, `Generator`).
"""
