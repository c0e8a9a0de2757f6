# kd: the two entry points of the README, plus developer targets.
#   make run    install missing Debian packages, build, run the Fashion-MNIST quick start
#   make test   install missing Debian packages, build, run the whole suite under ctest
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps build run test asan fuzz fuzz-ci fixtures bench clean

all: build

deps:
	@bash tools/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

run: build
	@bash tools/quickstart.sh $(BUILD)/kd

test: build
	@cd $(BUILD) && ctest --output-on-failure -j 1

# The suite under AddressSanitizer and UndefinedBehaviorSanitizer (every test;
# any sanitizer report fails the test that triggered it).
ASAN_BUILD ?= build-asan
asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DKD_SANITIZE=ON $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j 1

# libFuzzer targets (clang, ASan + UBSan) in build-fuzz: every target for
# FUZZ_SECONDS (default 60) each, growing build-fuzz/corpus; fuzz-ci runs each
# for FUZZ_CI_SECONDS (default 45) on the committed corpus (fuzz/corpus) only.
# docs/RELIABILITY.md has the campaign figures.
FUZZ_SECONDS ?= 60
fuzz:
	@FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

FUZZ_CI_SECONDS ?= 45
fuzz-ci:
	@FUZZ_SECONDS=$(FUZZ_CI_SECONDS) bash fuzz/run.sh ci

# Regenerates tests/fixtures with Debian's python3-torch and python3-torchvision
# (not needed to build or test).
fixtures:
	@KD_DEPS_EXTRA="python3-torch python3-torchvision python3-numpy" bash tools/install-deps.sh
	@/usr/bin/python3 tools/gen_fixtures.py tests/fixtures
	@/usr/bin/python3 tools/gen_zoo_fixtures.py tests/fixtures
	@/usr/bin/python3 tools/gen_imagenet_fixtures.py tests/fixtures

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
