#!/usr/bin/env bash
# End-to-end measurements against the release binary; one JSON line each.
#   bash benches/run.sh                 # ingest, reaction, burst
#   bash benches/run.sh reaction burst  # a selection
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin mapek
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(ingest reaction burst)
cargo bench --bench e2e -- "${which[@]}" 2>/dev/null | grep '^{'
