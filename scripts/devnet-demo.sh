#!/usr/bin/env bash
# Set up (venv + pip install -e .) and run a local grid doing real work: 4 validator processes,
# identities, transfers, the twin phonebook, farms, a validator crash drill, then tear down.
#
#   ./scripts/devnet-demo.sh            # demo in a fresh temporary directory
#   DEMO_DIR=./devnet KEEP=1 ./scripts/devnet-demo.sh   # keep the grid running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh
tfgrid() { .venv/bin/tfgrid "$@"; }
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
say() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; }
run() { say "tfgrid $(printf '%q ' "$@")"; tfgrid "$@"; }
json_field() { .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

DEMO_DIR=${DEMO_DIR:-$(mktemp -d -t tfgrid-demo.XXXXXX)/devnet}
ALICE=$DEMO_DIR-alice
if [ "${KEEP:-0}" != 1 ]; then
    trap 'say "tfgrid devnet down --dir $DEMO_DIR"; tfgrid devnet down --dir "$DEMO_DIR" || true' EXIT
fi

run devnet up --validators 4 --nodes 0 --dir "$DEMO_DIR"
export TFGRID_HOME=$DEMO_DIR          # the devnet directory is a home with a funded identity
run identity show
run account balance
run ledger status

say "tfgrid --home $ALICE identity create     # a second person (mnemonic kept out of the demo output)"
alice=$(tfgrid --home "$ALICE" identity create --json | json_field address)
echo "alice is $alice"
peers=$(tfgrid context show --json | .venv/bin/python -c 'import json,sys; print(",".join(json.load(sys.stdin)["peers"]))')
run --home "$ALICE" context set --peers "$peers" --genesis "$DEMO_DIR/genesis.json"

run account transfer "$alice" 50000000
run --home "$ALICE" account balance
run twin register operator --endpoint 127.0.0.1:7000
run --home "$ALICE" twin register alice
run twin lookup alice
run account transfer alice 1000000          # pay a twin by name
run farm create "Demo Farm" --country BE
run --home "$ALICE" farm create "Alice Acres" --country NL
run farm list

say "# fault drill: one of four validators down, the chain keeps committing"
run devnet stop validator-3
run account transfer alice 42
run ledger status
run devnet start validator-3
run devnet status

if [ "${KEEP:-0}" = 1 ]; then
    echo
    echo "The grid keeps running. Use it with:  export TFGRID_HOME=$DEMO_DIR"
    echo "Stop it with:  .venv/bin/tfgrid devnet down --dir $DEMO_DIR"
fi
