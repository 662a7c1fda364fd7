# The two commands the README leads with: `make demo` and `make test`.
# Both work on a fresh machine with Python 3.11, Java 17 and make.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= conf/local.yaml
# Jars for s3a:// outside EMR (Maven Central may be unreachable): taken from the
# sagemaker-pyspark source distribution on PyPI, cached outside git.
JARS_DIR := .cache/jars
JARS     := $(JARS_DIR)/hadoop-aws-3.3.1.jar $(JARS_DIR)/aws-java-sdk-bundle-1.11.901.jar

# Executors must run the venv's Python, and spark-submit must find it first.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYSPARK_PYTHON := $(CURDIR)/$(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(BIN)/python
# Quiet JVM logging for local spark-submit runs.
export SPARK_CONF_DIR := $(CURDIR)/conf/spark
# spark-submit starts the JVM before the job reads its profile: give it the memory here, and the
# master with task retries (its implicit local[*] would win over the profile's and allow one attempt).
SUBMIT := spark-submit --driver-memory 6g --master 'local[*,4]'

# Horovod 0.28.1 patched for torch 2.14 (deploy/horovod/): built once into a cache outside git,
# installed into the venv only for the tests and for train.backend=horovod.
WHEELS        := .cache/wheels
HOROVOD_WHEEL := $(WHEELS)/horovod-0.28.1-cp311-cp311-linux_x86_64.whl
HOROVOD_STAMP := $(VENV)/.horovod

.PHONY: setup demo test fuzz jars horovod browser clean

# Reinstalls only when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

$(JARS): | $(STAMP)
	$(BIN)/python -m sparkml.jars $(JARS_DIR)

jars: $(JARS)

$(HOROVOD_WHEEL): deploy/horovod/build.sh deploy/horovod/horovod-0.28.1-torch2.14.patch | $(STAMP)
	PYTHON=$(BIN)/python deploy/horovod/build.sh $(WHEELS)

$(HOROVOD_STAMP): $(HOROVOD_WHEEL) $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt $(HOROVOD_WHEEL)
	touch $@

horovod: $(HOROVOD_STAMP)

# Headless Chromium for the report test (Debian's packages), installed when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver \
		|| { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
		--no-install-recommends chromium chromium-driver; }; }

# The long run of the per-image fuzzer (make test runs a few hundred cases): 100,000 seeded
# mutations of JPEG, PNG, GIF and WebP files, each must end as an image or a reject.
FUZZ_CASES ?= 100000
fuzz: setup
	$(BIN)/python -m tests.fuzz --cases $(FUZZ_CASES)

demo: setup
	$(BIN)/python jobs/make_sample.py --config $(CONFIG)
	$(SUBMIT) jobs/ingest.py --config $(CONFIG)
	$(SUBMIT) jobs/prepare_images.py --config $(CONFIG)
	$(SUBMIT) jobs/dedup.py --config $(CONFIG)
	$(SUBMIT) jobs/train_lda.py --config $(CONFIG)
	$(SUBMIT) jobs/infer_topics.py --config $(CONFIG)
	$(SUBMIT) jobs/build_dataset.py --config $(CONFIG)
	$(SUBMIT) jobs/filter_followers.py --config $(CONFIG)
	$(SUBMIT) jobs/detect_faces.py --config $(CONFIG)
	@# The sample's '#me' selfies carry real faces; its quote images and city scenes do not pass the face filter.
	$(SUBMIT) jobs/build_dataset.py --config $(CONFIG) --set dataset.labels=likability
	@echo "AlexNet fc6/fc7 features with random weights (features.weights=none): this shows the pipeline, not ImageNet quality."
	$(SUBMIT) jobs/extract_features.py --config $(CONFIG)
	@echo "Likability SVMs on those features; the planted like-ratio signal puts AP above the test split's positive rate."
	$(SUBMIT) jobs/train_svm.py --config $(CONFIG)
	@# Caption topic vectors as the image embedding until the GoogLeNet regressor exists (an upper bound).
	$(SUBMIT) jobs/evaluate_retrieval.py --config $(CONFIG)
	$(SUBMIT) jobs/retrieve.py --config $(CONFIG) --query "skyline night" --k 20
	@echo "City AlexNet from random weights, 2 processes under TorchDistributor (--preset city-scratch: all layers"
	@echo "trained with Adam; the original's recipe, conv1-2 frozen + SGD, needs ImageNet weights). Chance is 10%."
	$(SUBMIT) jobs/train_cnn.py --config $(CONFIG) --task city --preset city-scratch
	@echo "Score a folder of new images (one of them truncated) with the models this run trained (city CNN, SVM)."
	$(SUBMIT) jobs/score.py --config $(CONFIG) --set score.input=./data/sample/new_images
	@echo "A personal archive: an Instagram export (JSON) ingested into its own lake, explored with VGG19 fc7 (random weights)."
	$(SUBMIT) jobs/ingest.py --config $(CONFIG) --set lake=./data/archive --set source.layout=instagram \
		--set source.path=./data/sample/instagram_export
	$(SUBMIT) jobs/prepare_images.py --config $(CONFIG) --set lake=./data/archive
	$(SUBMIT) jobs/explore.py --config $(CONFIG) --set explore.images=./data/archive/tables/images
	$(SUBMIT) jobs/report.py --config $(CONFIG)
	@echo
	@echo "Demo done. Results are under ./data/lake: tables/ (posts, images, duplicates, bow, topics, likability_labels,"
	@echo "faces, features, retrieval, scores, clusters, rejected), models/ (lda, likability_svm, city, kmeans), datasets/"
	@echo "(cities, likability), reports/, checkpoints/train_city/; each output has a _SUMMARY.json."
	@echo "The report: $(CURDIR)/data/lake/reports/index.html"

test: setup jars horovod browser
	$(BIN)/python -m pytest

clean:
	rm -rf data spark-warehouse metastore_db derby.log
