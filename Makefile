# fdlaunch: build, test, lint and install.
#
#   make test      virtualenv in .venv, the package installed in it, the whole suite
#   make lint      man pages (mandoc -Tlint) and Python (ruff)
#   make install   console scripts, man pages and examples under $(DESTDIR)$(PREFIX)
#   make demo      the README demo: a daemon started through fdlaunch-listen
#   make bench     start-up cost, readiness relay latency, handoffs under load,
#                  connections per second of fdlaunch-accept

# Debian's interpreter, so that the tests that drop to nobody can still run
# it (a pyenv under /root cannot be read by other users).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PREFIX ?= /usr/local
DESTDIR ?=
MANDIR ?= $(PREFIX)/share/man
PYTEST_FLAGS ?=

SOURCES := setup.cfg setup.py $(shell find fdlaunch -name '*.py')
MAN1 := $(wildcard man/*.1)
MAN7 := $(wildcard man/*.7)

.PHONY: all test lint install demo bench clean

all: lint

$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --use-pep517 '.[test,lint]'
	touch $@

test: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest $(PYTEST_FLAGS)

lint: $(VENV)/.installed
	mandoc -Tlint -W warning $(MAN1) $(MAN7)
	$(VENV)/bin/ruff check fdlaunch tests examples benchmarks
	$(VENV)/bin/ruff format --check fdlaunch tests examples benchmarks

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --use-pep517 --ignore-installed --root="$(or $(DESTDIR),/)" --prefix="$(PREFIX)" .
	install -d "$(DESTDIR)$(MANDIR)/man1" "$(DESTDIR)$(MANDIR)/man7"
	install -m 644 $(MAN1) "$(DESTDIR)$(MANDIR)/man1"
	install -m 644 $(MAN7) "$(DESTDIR)$(MANDIR)/man7"
	install -d "$(DESTDIR)$(PREFIX)/share/fdlaunch"
	cp -RP examples "$(DESTDIR)$(PREFIX)/share/fdlaunch/"

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" sh examples/demo.sh

bench: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python benchmarks/startup.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python benchmarks/notify_relay.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python benchmarks/handoff.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python benchmarks/accept.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
