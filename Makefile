# kd: the two entry points of the README, plus developer targets.
#   make run    install missing Debian packages, build, run the Fashion-MNIST quick start
#   make test   install missing Debian packages, build, run the whole suite under ctest
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps build run test asan fixtures bench clean

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

# The suite under AddressSanitizer and UndefinedBehaviorSanitizer.
asan: deps
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKD_SANITIZE=ON >/dev/null
	@cmake --build build-asan -j $(JOBS)
	@cd build-asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j 1

# Regenerates tests/fixtures with Debian's python3-torch and python3-torchvision
# (not needed to build or test).
fixtures:
	@KD_DEPS_EXTRA="python3-torch python3-torchvision python3-numpy" bash tools/install-deps.sh
	@/usr/bin/python3 tools/gen_fixtures.py tests/fixtures
	@/usr/bin/python3 tools/gen_zoo_fixtures.py tests/fixtures
	@/usr/bin/python3 tools/gen_imagenet_fixtures.py tests/fixtures

clean:
	rm -rf $(BUILD) build-asan
