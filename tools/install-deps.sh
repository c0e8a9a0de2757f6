#!/usr/bin/env bash
# Installs the Debian packages kd needs to build, test and run its default job.
# Idempotent: installs only what is missing. Needs root (or sudo) on Debian 12.
#   KD_DEPS_EXTRA="python3-torch" tools/install-deps.sh   # also the PyTorch reference
#   KD_CI=1 tools/install-deps.sh   # CI (.ci/run): also PyTorch, so that the PyTorch
#                                   # round-trip tests always run there, and Open MPI
#                                   # for the data-parallel tests (test_dist)
#   KD_DEPS_EXTRA="openmpi-bin libopenmpi-dev" tools/install-deps.sh   # mpirun -np N kd ...
set -euo pipefail
ci_pkgs=()
if [ "${KD_CI:-0}" = 1 ]; then ci_pkgs=(python3-torch python3-torchvision python3-numpy openmpi-bin libopenmpi-dev); fi
pkgs=(build-essential cmake pkg-config libdnnl-dev libcmocka-dev zlib1g-dev libyaml-dev
      libpng-dev libjpeg62-turbo-dev dataset-fashion-mnist ${ci_pkgs[@]+"${ci_pkgs[@]}"}
      ${KD_DEPS_EXTRA:-})
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "kd: installing ${missing[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
