# The README's two commands: `make serve` (the server on the bundled model) and `make test`.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast setup setup-system lock demo-model

# Python packages (torch CPU first, then unigemma[dev,server,train] within constraints.txt)
setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# Debian / Ubuntu packages the tests use (espeak-ng, fonts, chromium + chromium-driver): apt-get as root,
# otherwise the one command to run
setup-system:
	bash scripts/system_packages.sh

# Rewrite constraints.txt from the installed versions (after a green run on newer ones: see scripts/lock_deps.py)
lock:
	$(PYTHON) scripts/lock_deps.py

serve: setup
	PYTHON=$(PYTHON) HOST=$(HOST) PORT=$(PORT) bash scripts/serve.sh

test: setup-system setup
	$(PYTHON) -m pytest -q -m "not gpu"

test-fast: setup-system setup
	$(PYTHON) -m pytest -q -m "not gpu and not slow"

# Regenerate the bundled demo model from scratch (data, tokenizer, training, export; fixed seeds; ~2 h on 2 CPU cores)
demo-model: setup
	mkdir -p build/demo
	bash -o pipefail -c '$(MAKE) -f Makefile.demo demo-model 2>&1 | tee build/demo/demo-model.log'
