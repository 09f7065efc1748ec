#!/usr/bin/env bash
# Installs the Debian packages tensorspark needs, when they are missing.
# As root it runs apt-get; otherwise it names what is missing and how to get it.
set -euo pipefail

want=()
command -v java >/dev/null 2>&1 || want+=(openjdk-17-jre-headless)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || want+=(dataset-fashion-mnist)
# Lets the C++ test build reuse the package build's objects (Makefile CCACHE).
command -v ccache >/dev/null 2>&1 || want+=(ccache)
# CRC-32C with PCLMULQDQ/VPCLMULQDQ folding for frame checksums (the build
# falls back to its own code without it).
[ -f /usr/include/isa-l/crc.h ] || want+=(libisal-dev)
# SHA-256 and HMAC of the handshake (libcrypto; the build requires it).
[ -f /usr/include/openssl/evp.h ] || want+=(libssl-dev)
# Each flag adds what one kind of target needs; several may be given.
for flag in "$@"; do
  case "$flag" in
    --with-gtest)
      [ -f /usr/include/gtest/gtest.h ] || want+=(libgtest-dev) ;;
    --with-cluster)
      # `ip` puts the cluster test's Workers in network namespaces (root only).
      if [ "$(id -u)" -eq 0 ]; then command -v ip >/dev/null 2>&1 || want+=(iproute2); fi ;;
    --with-browser)
      # The status page's test drives a headless Chromium (tests/python/test_status_page.py).
      [ -x /usr/bin/chromium ] || want+=(chromium)
      [ -x /usr/bin/chromedriver ] || want+=(chromium-driver) ;;
    --with-lint)
      command -v clang-format >/dev/null 2>&1 || want+=(clang-format) ;;
    --with-fuzz)
      # clang plus its sanitizer and libFuzzer runtimes (Debian 12: clang 14).
      if ! command -v clang++ >/dev/null 2>&1; then
        want+=(clang libclang-rt-14-dev)
      elif [ ! -f "$(clang++ -print-resource-dir)/lib/linux/libclang_rt.fuzzer-x86_64.a" ]; then
        want+=(libclang-rt-14-dev)
      fi ;;
    *)
      echo "setup-system.sh: unknown flag $flag (use --with-gtest, --with-cluster," \
        "--with-browser, --with-lint or --with-fuzz)" >&2
      exit 2 ;;
  esac
done
[ ${#want[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "tensorspark needs these Debian packages: ${want[*]}" >&2
  echo "install them with: sudo apt-get install -y ${want[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
