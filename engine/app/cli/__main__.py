"""`python -m engine.app.cli`: the `hetpipe` program."""

from . import entry

if __name__ == "__main__":
    entry()
