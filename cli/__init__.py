"""The ``hookchains`` command line: a thin click layer over the public API."""
