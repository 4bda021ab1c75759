# Two commands on a fresh machine:
#   make demo   sets up, trains on Fashion-MNIST (Debian's dataset-fashion-mnist) and classifies an image
#   make test   sets up and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
DEMO   := demo

.PHONY: setup test demo bench clean chromium

$(BIN)/retrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,ray]'  # ray: so the --engine ray tests run too
	@touch $@

setup: $(BIN)/retrain

test: setup chromium
	$(BIN)/python -m pytest -q

# Debian's Chromium for the web page tests (tests/test_serve_browser.py); they skip, saying why,
# where it cannot be installed (not root, no apt-get).
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "Chromium not installed: the browser tests will be skipped"

$(FMNIST)/train-images-idx3-ubyte.gz:
	@command -v apt-get >/dev/null || { echo "Install Debian's dataset-fashion-mnist package first"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

$(DEMO)/fashion/train: $(FMNIST)/train-images-idx3-ubyte.gz | setup
	$(BIN)/retrain import-idx $(FMNIST)/train-images-idx3-ubyte.gz $(FMNIST)/train-labels-idx1-ubyte.gz \
		$(DEMO)/fashion/train --class-names fashion --limit-per-class 200
	$(BIN)/retrain import-idx $(FMNIST)/t10k-images-idx3-ubyte.gz $(FMNIST)/t10k-labels-idx1-ubyte.gz \
		$(DEMO)/fashion/test --class-names fashion --limit-per-class 50

demo: setup $(DEMO)/fashion/train
	$(BIN)/retrain --image_dir=$(DEMO)/fashion --output_graph=$(DEMO)/output_graph.onnx \
		--output_labels=$(DEMO)/output_labels.txt --time_budget 1  # the default run, fine-tuning for a minute
	@echo "--- label_image on a test image of a sneaker:"
	$(BIN)/label_image --graph=$(DEMO)/output_graph.onnx --labels=$(DEMO)/output_labels.txt \
		--input_layer=Placeholder --output_layer=final_result \
		--image=$$(ls $(DEMO)/fashion/test/Sneaker/*.png | head -1)

bench: setup
	$(BIN)/python benchmarks/bench_features.py

clean:
	rm -rf $(VENV) $(DEMO) build src/*.egg-info
