# shadowblk — every target installs what it needs first (Debian 12, as root).
#   make install   system packages, the virtualenv, the fast path, /usr/local/bin/shadowblk
#   make test      the whole test suite (what .ci/run calls)
#   make bench     the benchmarks (never part of the tests); figures in docs/benchmarks.md
#   make demo      the main job on one machine
#   make lint      ruff
#   make kernel-lab          only the tests that boot a Debian kernel under QEMU
#   make prediction-report   retrain on shared/data and regenerate docs/prediction.md
#   make smart-model         train the manager's SMART model (build/smart-model.json, --model)

VENV   := $(CURDIR)/.venv
PY     := $(VENV)/bin/python
export PATH := $(VENV)/bin:$(PATH)
SMART_MODEL := build/smart-model.json
TRAIN_SMART_MODEL = mkdir -p $(dir $(SMART_MODEL)) && \
	$(PY) -m shadowblk.cli predict train --data ../shared/data/hds.csv.gz --out $(SMART_MODEL)

.PHONY: install deps system-deps python-deps build test bench demo lint clean kernel-lab prediction-report smart-model

install: deps
	ln -sf $(VENV)/bin/shadowblk /usr/local/bin/shadowblk
	@echo "installed: $$(shadowblk --version)"

deps: system-deps python-deps build

system-deps:
	tools/install/system-deps.sh

python-deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	tools/install/python-env.sh $(VENV)
	touch $@

build: python-deps
	$(PY) setup.py -q build_ext --inplace

test: deps
	$(PY) -m pytest -q -ra tests

bench: deps
	$(PY) -m tools.bench.run

demo: deps $(SMART_MODEL)
	$(PY) -m tools.demo.run --model $(SMART_MODEL)

kernel-lab: deps
	$(PY) -m pytest -q -ra tests/kernel tests/unit/test_dm_era_reader.py tests/unit/test_dm_era_damage.py

prediction-report: deps
	$(PY) -m shadowblk.cli predict report --data ../shared/data/hds.csv.gz --out docs/prediction.md

smart-model: deps
	$(TRAIN_SMART_MODEL)

# the demo's manager scores with it: trained once (1-3 min), then kept; smart-model retrains it
$(SMART_MODEL): | deps
	$(TRAIN_SMART_MODEL)

lint: python-deps
	$(PY) -m ruff check shadowblk tests tools setup.py
	$(PY) -m ruff format --check shadowblk tests tools setup.py

clean:
	rm -rf build shadowblk/_native/*.so csrc/*.c .pytest_cache
