"""The test suite, a package: pytest imports its modules as `tests.<name>` with the repository root
on sys.path, so tests share helpers as `tests.conftest`, `tests.inprocess` and `tests.support`."""
