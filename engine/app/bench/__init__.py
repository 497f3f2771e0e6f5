"""`hetpipe bench serving|backends|pipeline`: each suite in a module of its own."""
