"""Dev-only helpers shared by tests/, bench/ and `make demo`; never shipped in the wheel.

Imported as `tests.support.<module>` with the repository root on sys.path (pytest's
`pythonpath`, bench/harness.py)."""
