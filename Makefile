# tensorspark: every target sets up what it needs (Debian packages as root,
# a .venv with TensorFlow, PySpark and the build tools) and then runs.
#
#   make demo    train the seed program on Fashion-MNIST on local[2]
#   make test    C++ tests (ctest) + Python tests (pytest on real Spark local[2],
#                then tests/connect against a local Spark Connect server)
#                + the cluster tests (make test-cluster)
#   make test-cluster
#                a real Spark standalone cluster (Master + 2 Workers, each Worker
#                in its own network namespace when root; else on loopback): the
#                seed and Keras examples via spark-submit, and an executor JVM
#                SIGKILLed mid-training; logs in build/test-cluster/
#   make bench   parameter-server throughput -> bench/results/ps_roundtrip.{json,png};
#                the Keras CNN's accuracy, throughput and memory bound ->
#                bench/results/keras_fashion_mnist.json
#   make chaos   the zombie-attempt test (pytest -m chaos), then
#                the seed program CHAOS_RUNS (10) times on local[2,4], each with a
#                random worker fault (SIGKILL or a fenced zombie) ->
#                bench/results/chaos.json; then SOAK_SECONDS (600) of 32 client
#                threads against one tensorspark-ps -> bench/results/soak.json
#   make bench-e2e  end to end on Fashion-MNIST against plain Keras and Elephas (in its
#                own .venv-elephas): samples/s and time to accuracy ->
#                bench/results/e2e.{json,png} and the table in docs/benchmarks.md
#                (about 20 min on 2 cores; E2E_FLAGS adds flags, e.g. --models softmax)
#   make bench-sparse  the sparse CTR benchmark on the seeded Criteo-like data
#                (docs/ctr_data.md): plain Keras, TF ParameterServerStrategy and
#                tensorspark -> bench/results/sparse.{json,png}; SPARSE_FLAGS adds
#                flags (e.g. --quick, --rows 200000, --systems keras,tf_ps)
#   make bench-inference  tensorspark.keras.predict against plain Keras predict on
#                the same 2 cores -> bench/results/inference.json (about 4 min)
#   make lint    clang-format + ruff
#   make fuzz    libFuzzer + ASan/UBSan on the frame decoders and the request
#                handler, FUZZ_SECONDS (600) in all; not part of `make test`

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
CMAKE := $(VENV)/bin/cmake
JOBS ?= 2
CPP_BUILD := build/cpp
FUZZ_BUILD := build/fuzz
FUZZ_SECONDS ?= 600
FUZZ_MAX_LEN ?= 65536
# Elephas pins tensorflow<2.20, pyspark<=4.0.0 and numpy<2: its own venv.
ELEPHAS_VENV := .venv-elephas
ELEPHAS_PYTHON ?= $(PYTHON)
ELEPHAS_DEPS := "elephas==7.3.0" "tensorflow==2.19.1" "pyspark==4.0.0" "numpy<2"
E2E_FLAGS ?=
# Spark's Python workers and tools must come from the venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYSPARK_PYTHON := $(CURDIR)/$(VPY)
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(VPY)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# ccache (installed by scripts/setup-system.sh) lets the test build reuse the
# core objects the package build compiled with the same flags.
CCACHE := CMAKE_CXX_COMPILER_LAUNCHER=$$(command -v ccache || true)

# pyspark[connect]: grpcio, protobuf and zstandard for SparkSession.builder.remote(...).
PY_DEPS := "tensorflow-cpu>=2.16" "pyspark[connect]>=4.0,<5" "numpy>=1.24" \
           "nanobind>=2.0" "scikit-build-core>=0.10" cmake ninja pytest pytest-timeout ruff matplotlib \
           "pyarrow>=14" "pandas>=2,<3" tensorboard "mlflow-skinny>=3" selenium

.PHONY: demo test test-cpp test-python test-connect test-cluster bench bench-e2e bench-sparse bench-inference elephas-venv chaos lint \
        fuzz system system-gtest venv install clean

demo: system install
	$(VPY) examples/fashion_mnist_seed.py --master "local[2]" --partitions 2 --epochs 2 \
	    --min-accuracy 0.80

test: system-gtest install test-cpp test-python test-cluster

test-cpp: system-gtest venv
	$(CCACHE) $(CMAKE) -S . -B $(CPP_BUILD) -G Ninja -DTENSORSPARK_BUILD_TESTS=ON \
	    -DTENSORSPARK_BUILD_BENCH=ON -DTENSORSPARK_BUILD_PYTHON=OFF >/dev/null
	$(CMAKE) --build $(CPP_BUILD) -j $(JOBS)
	cd $(CPP_BUILD) && ../../$(VENV)/bin/ctest --output-on-failure --timeout 300

# The status page's test drives Debian's headless Chromium with selenium.
test-python: install
	@scripts/setup-system.sh --with-browser
	$(VPY) -m pytest tests/python -v -m "not chaos" --durations=15
	$(MAKE) test-connect

# A process of its own: a SparkContext in the process would stop
# SparkSession.builder.remote("local[...]") from starting its Connect server.
test-connect: install
	$(VPY) -m pytest tests/connect -v --durations=5

# -s: the tests print the accuracy and time of each run, and whether the
# Workers got network namespaces or fell back to loopback.
test-cluster: install
	@scripts/setup-system.sh --with-cluster
	$(VPY) -m pytest tests/cluster -v -s --durations=5

# The Python binding's overhead (bench/python_overhead.py) needs the package
# installed, hence `install`.
bench: install
	$(CCACHE) $(CMAKE) -S . -B $(CPP_BUILD) -G Ninja -DTENSORSPARK_BUILD_BENCH=ON \
	    -DTENSORSPARK_BUILD_PYTHON=OFF >/dev/null
	$(CMAKE) --build $(CPP_BUILD) -j $(JOBS) --target ps_roundtrip
	$(CPP_BUILD)/ps_roundtrip --out bench/results/ps_roundtrip.json
	$(VPY) bench/python_overhead.py $(CPP_BUILD)/ps_roundtrip bench/results/ps_roundtrip.json
	$(VPY) bench/plot_ps_roundtrip.py bench/results/ps_roundtrip.json
	$(VPY) bench/keras_fashion_mnist.py --out bench/results/keras_fashion_mnist.json

CHAOS_RUNS ?= 10
SOAK_SECONDS ?= 600
# The soak tests the server built from this tree (--ps), not the venv's copy.
chaos: system install
	$(VPY) -m pytest tests/python -v -m chaos
	$(VPY) bench/chaos.py --runs $(CHAOS_RUNS) --out bench/results/chaos.json
	$(CCACHE) $(CMAKE) -S . -B $(CPP_BUILD) -G Ninja -DTENSORSPARK_BUILD_BENCH=ON \
	    -DTENSORSPARK_BUILD_PYTHON=OFF >/dev/null
	$(CMAKE) --build $(CPP_BUILD) -j $(JOBS) --target tensorspark-ps ps_soak
	$(VPY) bench/soak.py --seconds $(SOAK_SECONDS) --ps $(CPP_BUILD)/tensorspark-ps \
	    --soak $(CPP_BUILD)/ps_soak --out bench/results/soak.json

# One subprocess per row (plain Keras, tensorspark 1 and 2 workers x async/sync/ssp,
# Elephas sync/async), the same model, data, batch and thread budget (2) for all.
# bench/e2e.py --help lists the flags (--workers, --threads-per-worker, --scale).
bench-e2e: system install elephas-venv
	$(VPY) bench/e2e.py --elephas-python $(ELEPHAS_VENV)/bin/python $(E2E_FLAGS)

# tensorspark.keras.predict of the CNN over 60,000 rows on local[2] against plain
# Keras model.predict on the same 2 cores, ABBA rounds -> bench/results/inference.json.
bench-inference: system install
	$(VPY) bench/inference.py --out bench/results/inference.json

# One subprocess per row; the C++ microbenchmark (sparse_rows: pulls and pushes
# of 4,096 unique ids) is built into build/cpp and its JSON embedded.
SPARSE_FLAGS ?=
bench-sparse: system install
	$(CCACHE) $(CMAKE) -S . -B $(CPP_BUILD) -G Ninja -DTENSORSPARK_BUILD_BENCH=ON \
	    -DTENSORSPARK_BUILD_PYTHON=OFF >/dev/null
	$(CMAKE) --build $(CPP_BUILD) -j $(JOBS) --target sparse_rows tensorspark-ps
	$(VPY) bench/sparse.py --out bench/results/sparse.json $(SPARSE_FLAGS)

elephas-venv: $(ELEPHAS_VENV)/.deps-stamp
$(ELEPHAS_VENV)/.deps-stamp: Makefile
	test -x $(ELEPHAS_VENV)/bin/python || $(ELEPHAS_PYTHON) -m venv $(ELEPHAS_VENV)
	$(ELEPHAS_VENV)/bin/python -m pip install -q --upgrade pip
	$(ELEPHAS_VENV)/bin/python -m pip install -q $(ELEPHAS_DEPS)
	touch $@

lint: venv
	@scripts/setup-system.sh --with-lint
	clang-format --dry-run -Werror $$(git ls-files 'cpp/*.h' 'cpp/*.cc' 'tests/*.h' 'tests/*.cc' 'bench/*.h' 'bench/*.cc' \
	    'fuzz/*.h' 'fuzz/*.cc')
	$(VENV)/bin/ruff check python tests examples
	$(VENV)/bin/ruff format --check python tests

# Builds the fuzz targets with clang into build/fuzz and runs them one after
# the other: a quarter of FUZZ_SECONDS on frame_fuzzer (decoders), the rest
# on server_fuzzer (a live server per input). Corpora grow in
# build/fuzz/corpus/<target> from generated seeds; full logs go to
# build/fuzz/<target>.log and a crashing input to build/fuzz/artifacts/.
fuzz: venv
	@scripts/setup-system.sh --with-fuzz
	CC=clang CXX=clang++ $(CMAKE) -S . -B $(FUZZ_BUILD) -G Ninja -DTENSORSPARK_BUILD_FUZZ=ON \
	    -DTENSORSPARK_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	$(CMAKE) --build $(FUZZ_BUILD) -j $(JOBS) --target frame_fuzzer server_fuzzer fuzz_seeds
	rm -rf $(FUZZ_BUILD)/seeds
	mkdir -p $(FUZZ_BUILD)/seeds $(FUZZ_BUILD)/artifacts $(FUZZ_BUILD)/corpus/frame \
	    $(FUZZ_BUILD)/corpus/server
	$(FUZZ_BUILD)/fuzz_seeds $(FUZZ_BUILD)/seeds
	@set -o pipefail; \
	frame_s=$$(( $(FUZZ_SECONDS) / 4 > 0 ? $(FUZZ_SECONDS) / 4 : 1 )); \
	server_s=$$(( $(FUZZ_SECONDS) - frame_s > 0 ? $(FUZZ_SECONDS) - frame_s : 1 )); \
	for run in frame:$$frame_s server:$$server_s; do \
	  t=$${run%%:*}; secs=$${run#*:}; \
	  echo "== $${t}_fuzzer for $$secs s (new-coverage lines only in $(FUZZ_BUILD)/$${t}_fuzzer.log)"; \
	  $(FUZZ_BUILD)/$${t}_fuzzer -max_total_time=$$secs -max_len=$(FUZZ_MAX_LEN) -timeout=30 \
	      -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/ \
	      $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/seeds 2>&1 \
	    | tee $(FUZZ_BUILD)/$${t}_fuzzer.log | awk '!/^(#[0-9]+\t(NEW|REDUCE) |\tNEW_FUNC|")/' \
	    || { echo "$${t}_fuzzer FAILED: see $(FUZZ_BUILD)/$${t}_fuzzer.log and $(FUZZ_BUILD)/artifacts/"; exit 1; }; \
	done; \
	echo "== summary"; \
	for t in frame server; do \
	  echo "$${t}_fuzzer: $$(grep -h '^Done' $(FUZZ_BUILD)/$${t}_fuzzer.log);$$(grep -ho ' cov: [0-9]* ft: [0-9]*' $(FUZZ_BUILD)/$${t}_fuzzer.log | tail -1)"; \
	done

system:
	@scripts/setup-system.sh

system-gtest:
	@scripts/setup-system.sh --with-gtest

# The venv is (re)made when pyproject.toml changes.
venv: $(VENV)/.deps-stamp
$(VENV)/.deps-stamp: pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(PY_DEPS)
	touch $@

# Builds the C++ core, the _core extension and tensorspark-ps into the venv;
# the CMake build in build/py is kept, so rebuilds are incremental.
install: venv
	$(CCACHE) $(VPY) -m pip install -q --no-build-isolation --no-deps -Cbuild-dir=build/py .

clean:
	rm -rf build $(VENV) $(ELEPHAS_VENV)
