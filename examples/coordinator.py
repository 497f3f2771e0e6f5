"""A coordinator script: stream a chat answer through stage daemons, or through in-process stages.

    # daemons already running (see examples/lan.md):
    python examples/coordinator.py --stages tcp://192.168.1.20:5555=0-14,tcp://192.168.1.30:5555=15-29
    # or everything in this process:
    python examples/coordinator.py --local mlx:0-14,torch:15-29

The coordinator needs only the model's config and tokenizer; with --stages it imports neither
mlx nor torch.
"""

import argparse
import asyncio
import sys

from engine.api import Generator, SamplingParams, connect_pipeline, local_pipeline
from engine.app.fetch import default_model_dir

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=str(default_model_dir()))
where = ap.add_mutually_exclusive_group(required=True)
where.add_argument("--stages")
where.add_argument("--local")
ap.add_argument("prompt", nargs="?", default="Give me three tips for writing clear code.")
args = ap.parse_args()

if args.stages:  # the layer count comes from the model directory; the planner splits if no ranges are given
    pipeline = connect_pipeline(args.model, args.stages, log=lambda m: print(m, file=sys.stderr))
else:
    pipeline = local_pipeline(args.model, args.local)

gen = Generator(args.model, pipeline)  # it owns the pipeline: gen.close() closes both
messages = [{"role": "user", "content": args.prompt}]
for piece in gen.stream(messages, max_tokens=200, sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=0)):
    print(piece.text, end="", flush=True)
print()
result = gen.generate(messages, max_tokens=16)  # a whole result, with timings and log-probabilities
print(f"[ttft {result.ttft_ms:.0f} ms, {result.decode_tokens_per_s:.1f} tokens/s, stages {result.stages}]",
      file=sys.stderr)

# many prompts at once: one continuous batch, each with its own sampling
questions = ["What is a prime number?", "Name a color.", "Say hi in French."]
for q, r in zip(questions, gen.generate_batch([[{"role": "user", "content": q}] for q in questions], max_tokens=24,
                                              sampling=[SamplingParams(), SamplingParams(temperature=0.8, seed=1),
                                                        SamplingParams()])):
    print(f"{q} -> {r.text!r}")


# asyncio: two streams interleaved on one event loop; leaving one early cancels it everywhere
async def main():
    async def ask(q, n):
        out = []
        async for piece in gen.astream([{"role": "user", "content": q}], max_tokens=n):
            out.append(piece.text)
        return "".join(out)

    print(await asyncio.gather(ask("Count to five.", 20), ask("Spell 'cat'.", 10)))


asyncio.run(main())
gen.close()
