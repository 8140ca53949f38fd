# Two entry points, each bootstrapping what it needs on a fresh Debian machine:
#   make demo   a small mesh on this machine (network namespaces as root, loopback otherwise)
#   make test   lint, type check and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Debian packages: the venv itself, netns/veth tools, unit verification, and the
# real programs the end-to-end tests drive.
DEB_TEST := python3-venv python3-dev iproute2 systemd iputils-ping iperf3 curl nftables ethtool
DEB_DEMO := python3-venv iproute2

.PHONY: test demo lint typecheck clean debdeps-test debdeps-demo

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { deploy/debian-deps.sh python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

debdeps-test:
	@deploy/debian-deps.sh $(DEB_TEST)

debdeps-demo:
	@deploy/debian-deps.sh $(DEB_DEMO)

lint: $(STAMP)
	$(VENV)/bin/ruff check meshpipe workers tests bench

typecheck: $(STAMP)
	@mkdir -p .typecheck && ln -sfn ../workers .typecheck/meshpipe_workers
	$(VENV)/bin/mypy

test: debdeps-test $(STAMP) lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

demo: debdeps-demo $(STAMP)
	$(PY) -m meshpipe_workers.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
