# Build, test and demo targets for jps-domainbed.
# Stamp files in $(VENV) and $(DATA_DIR) record finished steps, so running
# `make test` again does not reinstall anything.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
EXTRAS ?= domainbed,slurm,benchmark,test
DATA_DIR ?= data
# Extra options for jps_domainbed.install_domainbed, such as --source PATH,
# --no-network or --force.
DOMAINBED_FLAGS ?=

VENV_PYTHON := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.jps-venv.stamp
DOMAINBED_STAMP := $(VENV)/.jps-domainbed.stamp
MNIST_STAMP := $(DATA_DIR)/MNIST/.jps-mnist.stamp
TORCH_PINS := torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)

.PHONY: venv domainbed domainbed-optional data test demo clean distclean

venv: $(VENV_STAMP)

# torch goes first so that the project's requirements never pick another
# version; listing the pins again keeps pip from upgrading them.
$(VENV_STAMP): setup.cfg pyproject.toml
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install $(TORCH_PINS)
	$(VENV_PYTHON) -m pip install -e '.[$(EXTRAS)]' $(TORCH_PINS)
	touch $@

domainbed: $(DOMAINBED_STAMP)

$(DOMAINBED_STAMP): $(VENV_STAMP) patches/domainbed-plugins.patch patches/domainbed-launchers.patch
	$(VENV_PYTHON) -m jps_domainbed.install_domainbed $(DOMAINBED_FLAGS)
	touch $@

# For `make test`: without DomainBed the tests marked `domainbed` skip, so a
# failed install is only a warning.
domainbed-optional: $(VENV_STAMP)
	@$(MAKE) --no-print-directory domainbed || \
		echo "WARNING: DomainBed could not be installed (see the error above), so the integration tests will be skipped. Fix it with: make domainbed DOMAINBED_FLAGS='--source PATH_OR_URL'" >&2

data: $(MNIST_STAMP)

$(MNIST_STAMP): $(VENV_STAMP)
	$(VENV_PYTHON) -m jps_domainbed.mnist_data --data_dir $(DATA_DIR)
	touch $@

test: venv domainbed-optional
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV_PYTHON) -m pytest -rs tests

# sweeps/cpu_smoke.sh runs with the virtualenv's bin/ first on PATH.
demo: venv domainbed data
	PATH="$(abspath $(VENV))/bin:$$PATH" bash sweeps/cpu_smoke.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache demo_output
	find jps_domainbed tests -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(VENV_STAMP) $(DOMAINBED_STAMP) $(MNIST_STAMP)

# Also removes the virtualenv (with the DomainBed installed in it) and the
# MNIST files. The DomainBed cache archive in ~/.cache/jps-domainbed stays.
distclean: clean
	rm -rf $(VENV) $(DATA_DIR)
