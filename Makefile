# Helios. The README starts with `make demo` and `make test`; both set everything up.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
CKPT     ?= weights/helios-tiny
REPO     ?= .triton/model_repository
PYTRITON := 0.7.0
# Extra options of helios_triton/fill_repository.py, e.g. FILL_ARGS="--device cuda --max-streams 4"
FILL_ARGS ?=
PROMPT   ?= a red circle moving left on a dark background

.PHONY: setup browser repository serve demo web perf test soak offline-bundle offline-flash clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt gateway/requirements.txt pyproject.toml \
		client/pyproject.toml gateway/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# The real Triton server: the tritonserver binary, its libraries and the python backend
	# ship in this wheel; only those files are used (not PyTriton's Python API), so no deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps nvidia-pytriton==$(PYTRITON)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . -e client -e gateway
	touch $@

repository: setup
	$(PY) -m helios_triton.fill_repository --checkpoint $(CKPT) --out $(REPO) $(FILL_ARGS)

# Triton in the foreground: HTTP 8000, gRPC 8001, metrics 8002.
serve: repository
	$(PY) -m helios_triton.server --repository $(REPO)

# Start Triton on the CPU with the tiny model, stream one prompt into out.mp4, stop.
demo: repository
	$(PY) -m helios_triton.server --repository $(REPO) --run \
		$(VENV)/bin/helios-client generate --prompt "$(PROMPT)" --duration 4 --seed 0 --output out.mp4

# Triton and the web gateway in the foreground: open the printed URL to watch and steer a video.
WEB_PORT ?= 8080
web: repository
	$(PY) -m helios_triton.server --repository $(REPO) --run \
		$(PY) -m helios_gateway --triton localhost:8001 --port $(WEB_PORT) --store .gateway/videos

# perf_analyzer in gRPC streaming mode over a concurrency range; CSV + JSON in benchmarks/results.
perf: repository
	$(PY) -m helios_triton.server --repository $(REPO) --run \
		$(PY) benchmarks/perf_analyzer.py --concurrency 1:4:1 --out benchmarks/results/perf

# Headless Chromium for the page's browser tests: Debian's package, never a browser manager's
# download.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: setup browser
	$(PY) -m pytest -q tests

# The server under load and faults for 10 minutes: 16 streams, random cancellations, one stage
# killed a minute; prints a table (benchmarks/results/soak/soak.json).
soak: setup
	$(PY) benchmarks/soak.py --minutes 10 --streams 16 --kill-every 60

# What a GPU host without internet needs (Triton server files, wheels, install.sh) in .offline;
# benchmarks/gpu.sh installs it there. BUNDLE_PYTHON: the host's Python (major.minor).
BUNDLE_PYTHON ?= 3.12
offline-bundle: setup
	$(PY) build/offline_bundle.py --out .offline --python $(BUNDLE_PYTHON)

# Optional: FlashAttention-4 for the refiner on Hopper/Blackwell, in parts (.offline-flash);
# benchmarks/gpu.sh installs it when every part is there.
offline-flash: setup
	$(PY) build/offline_bundle.py --flash-attention .offline-flash --python $(BUNDLE_PYTHON)

clean:
	rm -rf $(VENV) .triton .offline .offline-flash .gateway out.mp4
