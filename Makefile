# The two commands the README leads with: `make demo` and `make test`.
# Both work on a fresh machine with Python 3.12 and 3.11, Java 17 and make.

# Two stacks (pyproject.toml): spark35 (Spark 3.5, Python 3.11, constraints-spark35.txt) for EMR 7 and
# Dataproc 2.x, and spark4 (Spark 4.0, Python 3.12, constraints.txt) for EMR 8 and Dataproc 3.0/4.0.
# The default stack lives in .venv, the other in .venv-<stack>: `make demo STACK=spark35`. `make test`
# runs the whole suite on spark4 and, as one test of it, tests/spark35_lane.py's files on spark35.
DEFAULT_STACK := spark4
STACK ?= $(DEFAULT_STACK)
ifeq ($(STACK),spark4)
PY_VERSION  := 3.12
CONSTRAINTS := constraints.txt
else ifeq ($(STACK),spark35)
PY_VERSION  := 3.11
CONSTRAINTS := constraints-spark35.txt
else
$(error STACK must be spark4 or spark35, not '$(STACK)')
endif
VENV := $(if $(filter $(STACK),$(DEFAULT_STACK)),.venv,.venv-$(STACK))
PYTHON ?= $(shell deploy/find-python.sh $(PY_VERSION))
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
SUBMIT := spark-submit --driver-memory 6g --driver-java-options -XX:+ExitOnOutOfMemoryError --master 'local[*,4]'

# Horovod 0.28.1 patched for torch 2.14 (deploy/horovod/): built once into a cache outside git,
# installed into the venv only for the tests and for train.backend=horovod.
WHEELS        := .cache/wheels
comma         := ,
PY_TAG        := cp$(subst .,,$(PY_VERSION))
HOROVOD_WHEEL := $(WHEELS)/horovod-0.28.1-$(PY_TAG)-$(PY_TAG)-linux_x86_64.whl
HOROVOD_STAMP := $(VENV)/.horovod

.PHONY: setup demo test test-fast test-stack test-petastorm fuzz bundle jars horovod browser clean

# petastorm 0.13.1 patched for current pyarrow and numpy 2 (deploy/petastorm/): built once into
# the wheel cache, the only place pip finds version 0.13.1+instalearn1.
PETASTORM_WHEEL := $(WHEELS)/petastorm-0.13.1+instalearn1-py2.py3-none-any.whl

$(PETASTORM_WHEEL): deploy/petastorm/build.sh deploy/petastorm/petastorm-0.13.1-pyarrow15.patch
	PYTHON=$(PYTHON) deploy/petastorm/build.sh $(WHEELS)

# Reinstalls only when pyproject.toml, the stack's constraints or the petastorm patch change; a venv
# of another Python (a .venv made before the default moved to 3.12) is made anew.
$(STAMP): pyproject.toml $(CONSTRAINTS) $(PETASTORM_WHEEL)
	@test -n "$(PYTHON)" || { echo "make: no Python $(PY_VERSION) for STACK=$(STACK): give PYTHON=/path/to/python$(PY_VERSION)"; exit 2; }
	$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != ($(subst .,$(comma),$(PY_VERSION))))' 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --find-links $(WHEELS) -e ".[dev]"
	@# the same version number after a change to the patch: pip would keep the old build
	$(BIN)/python -m pip install -q --no-deps --force-reinstall $(PETASTORM_WHEEL)
	touch $(STAMP)

setup: $(STAMP)

$(JARS): | $(STAMP)
	$(BIN)/python -m core.jars $(JARS_DIR)

jars: $(JARS)

$(HOROVOD_WHEEL): deploy/horovod/build.sh deploy/horovod/horovod-0.28.1-torch2.14.patch | $(STAMP)
	PYTHON=$(BIN)/python deploy/horovod/build.sh $(WHEELS)

$(HOROVOD_STAMP): $(HOROVOD_WHEEL) $(STAMP)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) $(HOROVOD_WHEEL)
	touch $@

horovod: $(HOROVOD_STAMP)

# Headless Chromium for the report test (Debian's packages), installed when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver \
		|| { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
		--no-install-recommends chromium chromium-driver; }; }

# Petastorm's own test suite (its wheel ships petastorm/tests) against the patched build: the modules
# that run here without TensorFlow; the deselected tests exercise what no longer exists (pyarrow's legacy
# PartitionSet, pytest.warns(None)). deploy/petastorm/README.md lists the results per stack.
PETASTORM_MODULES := test_unischema test_codec_scalar test_codec_ndarray test_codec_compressed_image test_end_to_end \
	test_parquet_reader test_predicates test_pytorch_dataloader test_pytorch_utils test_reader test_generate_metadata \
	test_dataset_metadata test_decode_row test_transform test_shuffling_buffer test_ngram test_copy_dataset \
	test_arrow_table_serializer test_pickle_serializer test_disk_cache test_spark_session_cli \
	test_end_to_end_predicates_impl test_metadata_read test_run_in_subprocess test_spark_utils test_cache
PETASTORM_SKIP  := test_match_unischema_fields_legacy_warning or test_arrow_schema_convertion_with_string_partitions \
	or test_arrow_schema_convertion_with_int_partitions
PETASTORM_DEPS  := .cache/petastorm-test-deps-$(PY_TAG)
$(PETASTORM_DEPS): deploy/petastorm/test-requirements.txt | $(STAMP)
	rm -rf $@ && $(BIN)/python -m pip install -q --no-deps --target $@ -r deploy/petastorm/test-requirements.txt

test-petastorm: setup $(PETASTORM_DEPS)
	cd $$(mktemp -d) && PYTHONPATH=$(CURDIR)/deploy/petastorm/harness:$(CURDIR)/$(PETASTORM_DEPS) $(CURDIR)/$(BIN)/python -B \
		-m pytest -q -p no:cacheprovider --assert=plain -p test_shims -k "not ($(PETASTORM_SKIP))" \
		--pyargs $(addprefix petastorm.tests.,$(PETASTORM_MODULES))

# The long run of the per-image fuzzer (make test runs a few hundred cases): 100,000 seeded
# mutations of JPEG, PNG, GIF and WebP files, each must end as an image or a reject.
FUZZ_CASES ?= 100000
fuzz: setup
	$(BIN)/python -m tests.fuzz --cases $(FUZZ_CASES)

# What a cluster needs (deploy/bundle.py): a venv-pack archive of the pinned environment, the wheel and
# bundle.json under .cache/bundle/; FLAVOR=gpu (registry CUDA wheels), cpu (PyTorch's CPU index) or data
# (no torch). BUNDLE_ARGS="--python-prefix /usr --upload s3://bucket/prefix" for EMR 8; STACK=spark35 for EMR 7.
FLAVOR ?= gpu
bundle: setup
	$(BIN)/python -m deploy.bundle --flavor $(FLAVOR) $(BUNDLE_ARGS)

demo: setup
	@# The stage list is sparkml/pipeline.py, shared with the EMR and Dataproc launchers (deploy/).
	SUBMIT="$(SUBMIT)" $(BIN)/python -m sparkml.pipeline demo --config $(CONFIG)
	@echo
	@echo "Demo done. Results are under ./data/lake: tables/ (posts, images, duplicates, bow, topics, likability_labels,"
	@echo "faces, features, retrieval, scores, clusters, rejected), models/ (lda, likability_svm, city, kmeans), datasets/"
	@echo "(cities, likability), reports/, checkpoints/train_city/; each output has a _SUMMARY.json."
	@echo "The report: $(CURDIR)/data/lake/reports/index.html"

# One stack's tests: PYTEST_ARGS picks them (all when empty) and passes pytest's options.
test-stack: setup jars horovod browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# make test: the whole suite on spark4 in two pytest-xdist workers, a whole test file each at a time
# (its module fixtures built once), longest first (tests/conftest.py: by file, the run ends on short
# files), and the Spark 3.5 lane (tests/spark35_lane.py: the data side, training, faces
# and S3 on spark35) as one test of it, handed first to a worker: run after the suite, the lane kept
# one core busy of two for four minutes; beside it, the other worker fills the second.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The fast tier for development: every test not marked slow, on the default stack (a few minutes).
test-fast:
	$(MAKE) --no-print-directory test-stack STACK=spark4 PYTEST_ARGS="-m 'not slow'"

test:
	$(MAKE) --no-print-directory setup horovod STACK=spark35
	$(MAKE) --no-print-directory test-stack STACK=spark4 PYTEST_ARGS="$(XDIST) tests/spark35_lane.py $(wildcard tests/test_*.py)"
	@tail -n 1 .cache/spark35-lane.log | sed 's/^/spark35 lane: /'

clean:
	rm -rf data spark-warehouse metastore_db derby.log
