"""What `bench/suite.py` measures, a module a part; each `run_*` returns the part's raw
numbers for suite.json, and `suite_report.py` turns them into tables, plots and targets."""
