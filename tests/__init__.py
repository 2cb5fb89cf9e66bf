"""The test suite (a package, so that ``tests.example_method`` can be named by a training config)."""
