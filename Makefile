# Two commands do all the set-up on a fresh machine (see README):
#   make demo   - create .venv, install raylens, run the main job on the toy world
#   make test   - create .venv, install raylens with test extras, run the default tests
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build on machines that carry it on disk, the CUDA build from PyPI on GPU nodes.
TORCH_SPEC ?= torch==2.13.0

# The check that no test pins one build's rounding: the default tests that read the toy world
# (marked toyworld) against one built in an empty cache with another thread count (see README,
# "Figures and machines").
FRESH_WORLD ?= {"build_threads": 1}

.PHONY: install demo lint test test-faults test-integration test-fresh-world test-rehearsal test-cluster test-cluster-soak test-slow test-gpu bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/raylens demo

# ruff (pycodestyle, pyflakes, import order, docstrings, branching; pyproject.toml) and mypy
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest -q

# The tests that start Ray Train worker groups, sweeps or subprocess drivers (marked integration):
# every assertion the default run leaves out for time; CI runs them after it.
test-integration: install
	$(VENV)/bin/python -m pytest -q -m "integration and not slow and not rehearsal"

# Faults injected for real with servers and Ray (MLflow and PostgreSQL stopped mid-sweep, a
# hung rank, the security checks) and the 30-trial soak (docs/reliability.md); as root, about
# 40 minutes on 2 cores. Installs Debian's postgresql if missing.
test-faults: install
	ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null; }
	$(VENV)/bin/python -m pytest -q -s -m faults

test-fresh-world: install
	cache="$$(mktemp -d)"; RAYLENS_CACHE="$$cache" RAYLENS_TOYWORLD='$(FRESH_WORLD)' \
	    $(VENV)/bin/python -m pytest -q -m "toyworld and not slow and not rehearsal"; rc=$$?; \
	    rm -rf "$$cache"; exit $$rc

# The four real sweep files, unmodified, on an offline cache of stand-ins for their hub ids
# (REHEARSAL_SELECT: a pytest -k expression choosing among them; default all).
REHEARSAL_SELECT ?=
test-rehearsal: install
	$(VENV)/bin/python -m pytest -q -m rehearsal tests/test_rehearsal.py \
	    $(if $(REHEARSAL_SELECT),-k "$(REHEARSAL_SELECT)")

# As root: a head and two worker nodes in network namespaces on this machine, each with its own
# sshd; ray up, ray submit, a detached ray job submit and ray down of cluster.yaml (see
# tests/cluster/rehearse.py). Installs Debian's openssh-server, rsync and postgresql if missing.
test-cluster: install
	command -v sshd rsync > /dev/null && ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      openssh-server rsync postgresql > /dev/null; }
	$(PY) tests/cluster/rehearse.py

# As root: the fault soak (tests/faultsoak.py) on the same rehearsal cluster: 30 toy trials with
# attacks, a Train worker and the driver killed, MLflow stopped, PostgreSQL restarted (see
# tests/cluster/soak.py); about an hour on 2 cores, not in CI. SOAK_ARGS: e.g. --trials 4 --seed 7.
SOAK_ARGS ?=
test-cluster-soak: install
	command -v sshd rsync > /dev/null && ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      openssh-server rsync postgresql > /dev/null; }
	$(PY) tests/cluster/soak.py $(SOAK_ARGS)

# On a GPU machine: the real shapes (6.9B LoRA, 2.8B FSDP2) for one step each, see bench/gpu.py.
test-gpu: install
	$(VENV)/bin/python bench/gpu.py

test-slow: install
	$(PY) -m pip install --quiet -e ".[test,ui-test]"
	$(VENV)/bin/python -m pytest -q -m slow

# Every benchmark, one after another (never beside tests: two torch processes on 2 cores
# thrash); each prints ratios measured side by side. bench/sweep_efficiency.py joins them once
# its table is built (`python bench/sweep_efficiency.py --build`, about 40 min, kept in
# bench/data/); it has not been yet.
bench: install
	$(VENV)/bin/python bench/toyworld_cache.py
	$(VENV)/bin/python bench/fsdp_memory.py
	$(VENV)/bin/python bench/eval_speed.py
	$(VENV)/bin/python bench/eval_speed.py --end-to-end
	$(VENV)/bin/python bench/step_cost.py
	$(VENV)/bin/python bench/scaling.py
	$(VENV)/bin/python bench/sweep_efficiency.py
