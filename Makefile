# Two commands: `make demo` and `make test`. The first run creates .venv and installs
# the core, the SDK and every plugin in this repo (editable), with torch pinned to the
# CPU wheel available on these machines, then builds the cpu device's panel kernel (AVX-512
# CPUs only) and the SDK's CPU GEMV kernels (both cached per torch build under $DSR1_HOME), so
# the first generate does not compile them.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
PLUGINS := $(sort $(dir $(wildcard plugins/*/*/pyproject.toml)))
STAMP   := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml sdk/pyproject.toml $(wildcard plugins/*/*/pyproject.toml) Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.13.0
	$(PIP) install --no-build-isolation -e '.[test,serve]' -e 'sdk[testing]' $(addprefix -e ,$(PLUGINS))
	$(PY) -m dsr1_device_cpu.panels
	$(PY) -m dsr1_sdk.kernels.cpu
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dsr1 generate --model dsr1-tiny --max-new-tokens 40 --seed 0 "The Python interpreter"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist
