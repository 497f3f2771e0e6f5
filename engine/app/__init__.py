"""The application layer: composes the contract, serving, backends and transport (CLI, demo, bench)."""
