# chatd developer commands. The README's two set-up lines are `make run` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# System tools the tests run for real: redis-server (Redis backend, multi-node tests) and
# systemd-analyze (unit file checks). Installed from Debian packages when missing.
SYSTEM_TOOLS := redis-server systemd-analyze

.PHONY: run test smoke loadtest system-deps lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,loadtest]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/chatd serve

system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing (Debian packages redis-server, systemd)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server systemd >/dev/null; \
	fi

test: system-deps $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider

loadtest: $(VENV)/.installed
	$(VENV)/bin/python -m loadtest --help

lint: $(VENV)/.installed
	$(VENV)/bin/pip install -q ruff mypy
	$(VENV)/bin/ruff check chatd loadtest tests
	$(VENV)/bin/mypy chatd

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
