"""What the Python API builds pipelines from: stage specs, the planner, loading a stage in process
(with a Hub checkpoint's weight files fetched as needed), and giving memory back after a load.
`engine.api` and the application layer (`engine.app`: CLI, server, benchmarks) import it; it
imports only `engine.core`."""
