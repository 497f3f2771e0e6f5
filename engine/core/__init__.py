"""The contract every part agrees on, and the model description. Imports nothing else of hetpipe's."""
