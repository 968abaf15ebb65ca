# fdlaunch: build, test, lint and install.
#
#   make test      virtualenv in .venv, the package installed in it, the whole suite
#   make lint      man pages (mandoc -Tlint) and Python (ruff)
#   make install   console scripts, man pages and examples under $(DESTDIR)$(PREFIX)
#   make uninstall removes exactly what make install put there
#   make demo      the README demo: a daemon started through fdlaunch-listen
#   make bench     start-up cost, readiness relay latency, handoffs under load,
#                  connections per second of fdlaunch-accept, the cost of a bind
#                  through fdlaunch-adopt
#
# make install PREFIX=/usr/local [DESTDIR=/tmp/stage] installs:
#   $(PREFIX)/lib/fdlaunch/       the package and its dependency docopt-ng (pip install
#                                 --target from a wheel), never the system's site-packages
#   $(PREFIX)/bin/fdlaunch-*      one script per console_scripts entry of setup.cfg, run
#                                 by $(PYTHON), putting $(PREFIX)/lib/fdlaunch first on sys.path
#   SITE/fdlaunch                 a link to the package alone, in $(PYTHON)'s site directory
#                                 under $(PREFIX), so daemons can `import fdlaunch`
#   $(MANDIR)/man1 and man7 (MANDIR=$(PREFIX)/share/man), $(PREFIX)/share/fdlaunch/examples
# The list of what it created is $(PREFIX)/lib/fdlaunch/installed-files; DESTDIR
# appears in no installed file, so a staged tree works once copied to $(PREFIX).
# It needs a pip of the same Python version: the one of the virtualenv in $(VENV),
# created by $(PYTHON) if missing.

# The interpreter the tools run under, and the one make test tests: the suite
# reads its path from FDLAUNCH_TEST_PYTHON (asked before the virtualenv is on
# PATH, where python3.X would be the virtualenv's). Debian's by default, so
# that the tests that drop to nobody can run it (a pyenv under /root cannot be
# read by other users: with one, those tests skip and say so). A virtualenv
# serves the Python version that made it: another PYTHON needs another VENV.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PREFIX ?= /usr/local
DESTDIR ?=
MANDIR ?= $(PREFIX)/share/man
PYTEST_FLAGS ?=

SOURCES := setup.cfg setup.py pyproject.toml $(shell find fdlaunch -name '*.py')
MAN1 := $(wildcard man/*.1)
MAN7 := $(wildcard man/*.7)
# For PATH, whether VENV is given relative or absolute.
VENV_BIN = $(abspath $(VENV))/bin

.PHONY: all test lint install uninstall demo bench clean fresh-build

all: lint

# setuptools builds in build/lib and keeps what an earlier build left there:
# a module since moved or removed would be installed too.
fresh-build:
	rm -rf build/lib

$(VENV)/.installed: $(SOURCES) | fresh-build
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --use-pep517 '.[test,lint]'
	touch $@

test: $(VENV)/.installed
	FDLAUNCH_TEST_PYTHON="$$($(PYTHON) -c 'import sys; print(sys.executable)')" PATH="$(VENV_BIN):$$PATH" $(VENV)/bin/python -m pytest $(PYTEST_FLAGS)

lint: $(VENV)/.installed
	mandoc -Tlint -W warning $(MAN1) $(MAN7)
	$(VENV)/bin/ruff check fdlaunch tests examples benchmarks build-aux
	$(VENV)/bin/ruff format --check fdlaunch tests examples benchmarks build-aux

install: fresh-build
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PYTHON) build-aux/install.py install --prefix="$(PREFIX)" --mandir="$(MANDIR)" --destdir="$(DESTDIR)" --pip="$(VENV)/bin/python"

uninstall:
	$(PYTHON) build-aux/install.py uninstall --prefix="$(PREFIX)" --destdir="$(DESTDIR)"

# demo.sh runs its daemon with $PYTHON: the virtualenv's, which has the package,
# whatever PYTHON make was given.
demo: $(VENV)/.installed
	PATH="$(VENV_BIN):$$PATH" PYTHON="$(VENV_BIN)/python" sh examples/demo.sh

bench: $(VENV)/.installed
	PATH="$(VENV_BIN):$$PATH" $(VENV)/bin/python benchmarks/startup.py
	PATH="$(VENV_BIN):$$PATH" $(VENV)/bin/python benchmarks/notify_relay.py
	PATH="$(VENV_BIN):$$PATH" $(VENV)/bin/python benchmarks/handoff.py
	PATH="$(VENV_BIN):$$PATH" $(VENV)/bin/python benchmarks/accept.py
	PATH="$(VENV_BIN):$$PATH" $(VENV)/bin/python benchmarks/adopt.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
