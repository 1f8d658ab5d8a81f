#!/bin/sh
# A long fuzz run of one target (issue #16): scripts/fuzz.sh TARGET SECONDS [SEED]
# Targets: tensor-file checkpoint graph recipe cifar idx image. Runs at low priority.
set -eu
if [ $# -lt 2 ]; then
    echo "usage: scripts/fuzz.sh TARGET SECONDS [SEED]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
nice -n 10 cargo build --release --example fuzz --quiet
exec nice -n 10 target/release/examples/fuzz "$@"
