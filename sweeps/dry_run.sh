#!/usr/bin/env bash
# Print the paper-protocol job list through DomainBed's dummy launcher.
# Reads no data and starts no job; DomainBed's sweep still creates the
# empty job folders under OUTPUT_DIR (default: a new temporary folder).
set -euo pipefail
OUTPUT_DIR=${OUTPUT_DIR:-$(mktemp -d)}
export OUTPUT_DIR
DRY_RUN=1 exec bash "$(dirname "$0")/paper_protocol.sh" "$@"
