# The two commands of the README: `make book` (runs the study, builds the book) and `make test`.
# Each creates or refreshes .venv from the pinned requirements by itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= quick
DATA_DIR ?= data
PRETRAINED ?= true
RESULTS ?=
STAMP := $(VENV)/.installed

.PHONY: book test venv data chromium lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements-lock.txt -e .
	@touch $@

# The data root holds cifar10/ and ferplus/. When it is missing and the workplace's
# local copies exist in ../shared/data, unpack them there; otherwise leave it to
# the loaders (CIFAR-10 downloads through torchvision, FERPlus needs your own copy).
data:
	@if [ ! -d "$(DATA_DIR)/cifar10" ] && [ -x ../shared/data/extract.sh ]; then ../shared/data/extract.sh "$(DATA_DIR)"; fi

# A failed run still gets its page (a note saying what failed); the book is built either way,
# and `make book` then exits with the study's status. --all: Sphinx re-reads (so re-executes) only
# pages whose source changed, and the chapters' sources do not change when the runs do.
# With RESULTS=BUNDLE.tar.gz the bundle is checked and unpacked into runs/bundle/ and the book is built
# from it alone: no data step, no run (the Datasets and Errors pages read the bundle's data summary).
book: venv $(if $(RESULTS),,data)
ifeq ($(RESULTS),)
	$(BIN)/transferstudy run --profile $(PROFILE) --data-root "$(DATA_DIR)" -p pretrained $(PRETRAINED); status=$$?; \
	$(BIN)/transferstudy book-data --profile $(PROFILE) --data-root "$(DATA_DIR)" && \
	$(BIN)/jupyter-book build . --all -n -W --keep-going && exit $$status
else
	$(BIN)/transferstudy import-results "$(RESULTS)" --to runs/bundle && \
	$(BIN)/transferstudy book-data --results runs/bundle && \
	$(BIN)/jupyter-book build . --all -n -W --keep-going
endif

# The book's browser test drives Debian's Chromium (Playwright is pointed at it; no browser is downloaded).
chromium:
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

test: venv chromium
	$(BIN)/python -m pytest

lock: venv
	( echo "# Full pinned set (pip constraints) for reproducible installs; regenerate with 'make lock'."; \
	  $(BIN)/python -m pip freeze --exclude-editable ) > requirements-lock.txt

clean:
	rm -rf _build runs
