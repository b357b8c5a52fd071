# Two commands do all the set-up: `make demo` and `make test`.
# Bring your own torch with e.g. `make TORCH="torch==2.5.1" test`, or TORCH= to keep the one installed.
# torch comes from PyTorch's CPU wheel index (pip's default index serves CUDA builds on Linux);
# TORCH_INDEX= takes it from pip's own index instead, as does a machine that cannot reach that index
# (an offline mirror). Only torch itself comes from it (--no-deps): the second install then finds
# torch there and takes its dependencies from pip's own index (an unreachable index as the only one
# cost ~8 s of retries per dependency).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
DEMO_DIR ?= demo_checkpoints
PORT ?= 8888
# Jupyter refuses to start as root without this (containers, CI machines)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: demo test venv bench fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# CPU torch goes in first, so the project's `torch>=2.4` finds it and pulls no CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(if $(strip $(TORCH)),$(if $(strip $(TORCH_INDEX)),$(BIN)/python -m pip install --quiet --no-deps --index-url $(TORCH_INDEX) "$(TORCH)" || echo "torch: $(TORCH_INDEX) not reachable; taking it from pip's own index";) $(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet -e ".[lab,test]"
	# bytecode, as pip writes it for an installed package: an editable install leaves the sources
	# alone, and where PYTHONDONTWRITEBYTECODE is set (CI images) every command compiled them again
	# (`ckptview scan` on a 20,000-tensor file: 0.29 -> 0.22 s)
	$(BIN)/python -m compileall -q ckptview
	touch $@

venv: $(VENV)/.installed

test: venv
	$(BIN)/python -m pytest

# JupyterLab prints the URL with its token; the notebook finds the samples through CKPTVIEW_DEMO_DIR.
demo: venv
	$(BIN)/python -m ckptview.demo $(DEMO_DIR)
	CKPTVIEW_DEMO_DIR="$(abspath $(DEMO_DIR))" $(BIN)/jupyter lab --ip=127.0.0.1 --port=$(PORT) --no-browser \
		$(ROOT_FLAG) --notebook-dir=. notebooks/explore.ipynb

# Structure-aware fuzzing of the readers (tests/fuzz.py); failing inputs are kept in test-artifacts/fuzz.
FUZZ_MINUTES ?= 30
fuzz: venv
	$(BIN)/python tests/fuzz.py --seconds $$(( $(FUZZ_MINUTES) * 60 )) --report test-artifacts/fuzz-report.json

bench: venv
	for script in bench/*_bench.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) test-artifacts
