# `make demo` and `make test` set everything up on a fresh machine (`make e2e` adds the agent CLIs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On Linux, MLX's CPU matmuls run ~35x faster on the system OpenBLAS (see README.md, "Linux").
BLAS    = LD_PRELOAD="$$($(PY) -c 'from daemon.blas import openblas_path; print(openblas_path() or "")')"

.PHONY: install system-deps lint test test-oldest e2e demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: system-deps $(VENV)/.installed

# Best effort: Debian's OpenBLAS and redis-server on Linux when we may install packages; harmless elsewhere.
# apt waits for a lock another apt holds (up to 5 min); a note is printed only when the
# package is still missing after the attempt.
APT = apt-get -qq -o DPkg::Lock::Timeout=300
system-deps:
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 \
	   && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	   ($(APT) update; $(APT) install -y libopenblas0-pthread) >/dev/null 2>&1; \
	   ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 \
	   || echo "note: could not install libopenblas0-pthread; MLX will use its slow bundled BLAS"; fi
	@# redis-server for the shared tier's tests (tests/test_shared.py skips without it).
	@if [ "$$(uname -s)" = Linux ] && ! command -v redis-server >/dev/null && ! command -v valkey-server >/dev/null \
	   && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	   ($(APT) update; $(APT) install -y redis-server) >/dev/null 2>&1; \
	   command -v redis-server >/dev/null \
	   || echo "note: could not install redis-server; the shared-tier tests will be skipped"; fi
	@# chromium and its driver for the browser tests (tests/test_browser_page.py skips without them).
	@if [ "$$(uname -s)" = Linux ] && ! command -v chromedriver >/dev/null \
	   && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	   (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	   || echo "note: could not install chromium; the browser tests will be skipped"; fi

# Three test processes, a file each at a time (module-scoped daemons stay in one process):
# most tests wait on a daemon's start-up or I/O, so three keep two cores busy (the suite took
# 7:58 with three, 9:50 with two, on the same 2-core machine in one afternoon). The longest
# files go first (tests/support/schedule.py), not xdist's most-tests-first order.
TEST_WORKERS ?= 3

# Lint before the tests, so that a lint failure stops `make test` (seconds; mypy caches in .mypy_cache).
lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

test: install lint
	$(BLAS) $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The cache-protocol and exactness tests on the lowest mlx and mlx-lm pyproject.toml allows, in
# a venv of their own (mlx-lm before 0.32 splits a cache's state into state + meta_state).
OLDEST_VENV   ?= .venv-oldest
OLDEST_PY     := $(OLDEST_VENV)/bin/python
MLX_LM_OLDEST := $(shell sed -n 's/^ *"mlx-lm>=\([0-9.]*\)",$$/\1/p' pyproject.toml)
MLX_OLDEST    := $(shell sed -n 's/^ *"mlx\[cpu\]>=\([0-9.]*\);.*/\1/p' pyproject.toml)
OLDEST_TESTS  ?= tests/test_cache_protocol.py tests/test_kvstate.py tests/test_quantized.py tests/test_live.py \
                 tests/test_prefetch.py

$(OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -e '.[test]' 'mlx-lm==$(MLX_LM_OLDEST)' \
	  "$$(if [ "$$(uname -s)" = Darwin ]; then echo mlx; else echo 'mlx[cpu]'; fi)==$(MLX_OLDEST)"
	touch $@

test-oldest: system-deps $(OLDEST_VENV)/.installed
	@$(OLDEST_PY) -c 'import mlx.core as mx, mlx_lm; v = (mx.__version__, mlx_lm.__version__); \
	  assert v == ("$(MLX_OLDEST)", "$(MLX_LM_OLDEST)"), v; print("mlx %s, mlx-lm %s" % v)'
	LD_PRELOAD="$$($(OLDEST_PY) -c 'from daemon.blas import openblas_path; print(openblas_path() or "")')" \
	  $(OLDEST_PY) -m pytest -q $(OLDEST_TESTS)

# Real agents end to end (Claude Code and Codex from npm via npx; skip where npm cannot install them).
e2e: install
	$(BLAS) $(PY) -m pytest -q -m e2e

demo: install
	$(BLAS) $(PY) bench/demo.py

# The full suite (with the large-cache scale table and the memory check), the parallel-agents
# run, two models in one session and the shared tier's bench (docs/benchmarks.md);
# bench/ttft.py still runs on its own.
bench: install
	$(BLAS) $(PY) bench/suite.py
	$(BLAS) $(PY) bench/parallel.py
	$(BLAS) $(PY) bench/models.py
	@if command -v redis-server >/dev/null || command -v valkey-server >/dev/null; then \
	   $(BLAS) $(PY) bench/shared.py --write; else echo "note: no redis-server: bench/shared.py skipped"; fi

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .models .demo .bench .mypy_cache .ruff_cache .import_linter_cache
