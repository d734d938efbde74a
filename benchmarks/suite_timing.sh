#!/usr/bin/env bash
# Time the whole test suite at two commits in one fresh clone, the way CI runs it (`bash .ci/run`), one run after the
# other: NEW, BASE, NEW again. Run it alone on the machine (no other jobs: the suite is CPU-bound).
#
# usage: bash benchmarks/suite_timing.sh [BASE_REV] [NEW_REV] [WORK_DIR]
#        defaults: 731da3a (the code issue 12 was filed on), HEAD, /tmp/suite-timing
# The clone gets ../shared beside it (a link to this checkout's ../shared). Prints one line per run:
#   <UTC time> rev=<sha> rc=<exit> wall=<s incl. set-up> pytest: <pytest's last line>
set -uo pipefail
cd "$(dirname "$0")/.."
BASE="${1:-731da3a}"
NEW="$(git rev-parse "${2:-HEAD}")"
WORK="${3:-/tmp/suite-timing}"
rm -rf "$WORK" && mkdir -p "$WORK"
git clone -q "$(pwd)" "$WORK/main" && ln -s "$(cd .. && pwd)/shared" "$WORK/shared"
cd "$WORK/main" || exit 1
for rev in "$NEW" "$BASE" "$NEW"; do
    git checkout -q "$rev"
    start=$(date +%s)
    log="$WORK/run-$(git rev-parse --short HEAD)-$start.log"
    bash .ci/run > "$log" 2>&1
    rc=$?
    echo "$(date -u +%FT%TZ) rev=$(git rev-parse --short HEAD) rc=$rc wall=$(( $(date +%s) - start ))s" \
        "pytest: $(grep -E '^[0-9]+ passed|failed' "$log" | tail -1)"
done
