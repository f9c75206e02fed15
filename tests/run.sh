#!/usr/bin/env bash
# The test command of the README: installs what the tests need when it is
# missing (Debian's prometheus and prometheus-alertmanager, for the
# end-to-end tests against real servers; etcd-server for the cluster tests;
# protobuf-compiler and libprotobuf-dev, which the `cluster` feature's etcd
# client needs at build time), then runs every test, with cluster mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${need[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The end-to-end tests fail (never skip) when the servers are missing.
export MAPEK_REQUIRE_SERVERS=1
cargo test --workspace --all-targets --features mapek/cluster "$@"
