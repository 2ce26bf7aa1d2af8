# One-command setup: a virtual environment at .venv with the project and pinned dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

# No telemetry, no hub downloads: the embedded default needs neither.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch is installed first and pinned, so nothing later can pull a multi-GB CUDA build on a CPU
# machine; requirements/constraints.txt pins everything else to the versions tested here.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev,ocr]'
	touch $@

# The stages call `tpgrpo`, so the venv's bin directory goes first on PATH.
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "Report: reports/ablation.md (plots: reports/*.png); base model samples: reports/base_model.png"
	@$(BIN)/python -c 'from tpgrpo.cli import mlflow_hint; from tpgrpo.config import load_config; print(mlflow_hint(load_config("params.yaml")))'

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
