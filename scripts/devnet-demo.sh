#!/usr/bin/env bash
# Set up (venv + pip install -e .) and run a local grid doing real work: 4 validator processes
# and 24 node agents on 6 farms in 6 countries; identities, transfers, the twin phonebook, farms;
# a busybox web server deployed as a container (runc) from a manifest, answering HTTP, then
# cancelled; a validator and a node fault drill; a file in grid storage read back with 4 of
# its 20 nodes down, then repaired and removed; then tear down. Needs root (agents run runc).
#
#   sudo ./scripts/devnet-demo.sh            # demo in a fresh temporary directory
#   DEMO_DIR=./devnet KEEP=1 ./scripts/devnet-demo.sh   # keep the grid running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "devnet-demo: the node agents run containers with runc: run this as root" >&2
    exit 1
fi
bash scripts/bootstrap.sh
tfgrid() { .venv/bin/tfgrid "$@"; }
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
say() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; }
run() { say "tfgrid $(printf '%q ' "$@")"; tfgrid "$@"; }
json_field() { .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

SCRATCH=""  # a temporary directory of our own, removed at the end unless KEEP=1
if [ -z "${DEMO_DIR:-}" ]; then
    SCRATCH=$(mktemp -d -t tfgrid-demo.XXXXXX)
    DEMO_DIR=$SCRATCH/devnet
fi
ALICE=$DEMO_DIR-alice
if [ "${KEEP:-0}" != 1 ]; then
    cleanup() {
        say "tfgrid devnet down --dir $DEMO_DIR"
        tfgrid devnet down --dir "$DEMO_DIR" || true
        if [ -n "$SCRATCH" ]; then rm -rf -- "$SCRATCH"; fi
    }
    trap cleanup EXIT
fi

run devnet up --validators 4 --nodes 24 --farms 6 --dir "$DEMO_DIR"
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
run farm list                               # the devnet's 6 farms and these 2
run node list                               # 24 node agents, spread over the devnet's farms
run capacity --by country

say "# a container: build a busybox rootfs, publish it, deploy a web server from a manifest"
.venv/bin/python -m zos_agent.images build-busybox "$DEMO_DIR-busybox" >/dev/null
run image push "$DEMO_DIR-busybox"
image=$(tfgrid image push "$DEMO_DIR-busybox" --json | json_field image)
cat > "$DEMO_DIR-web.yaml" <<EOF
name: web
node: auto
workloads:
  - name: httpd
    kind: container
    image: $image
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    env: {GREETING: hi}
    secret_env: {TOKEN: s3cret}
    cpu: 1
    memory: 64MiB
    disk: 64MiB
    ports: [80]
    restart: always
EOF
say "cat $DEMO_DIR-web.yaml"
cat "$DEMO_DIR-web.yaml"
say "tfgrid deploy $DEMO_DIR-web.yaml --json   # waits until the node reports every workload ok"
deployed=$(tfgrid deploy "$DEMO_DIR-web.yaml" --json)
echo "$deployed"
contract=$(echo "$deployed" | json_field contract)
run contract show "$contract"
endpoint=$(tfgrid contract show "$contract" --json \
    | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["workloads"][0]["endpoint"])')
say "curl http://$endpoint/     # the container's published port"
.venv/bin/python -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end="")' "http://$endpoint/"
run capacity
run contract cancel "$contract"      # waits until the node reports the workload deleted
run contract list

say "# fault drill: one of four validators down, the chain keeps committing"
run devnet stop validator-3
run account transfer alice 42
run ledger status
run devnet start validator-3
say "# fault drill: a node agent down and up again (its containers would keep running)"
run devnet stop node-3
run devnet start node-3

say "# grid storage: a file encrypted, coded 16-of-20 and spread over 20 nodes in 6 farms"
head -c 16M /dev/urandom > "$DEMO_DIR-file.bin"
say "tfgrid storage put $DEMO_DIR-file.bin    # a progress bar on a terminal, then the capability"
put=$(tfgrid storage put "$DEMO_DIR-file.bin")
echo "$put"
cap=$(echo "$put" | head -n 1)
run storage ls
# the devnet names (node-K) of the nodes holding shards 0-3
lost=$(tfgrid storage check "$cap" --json | .venv/bin/python -c '
import json, subprocess, sys
placed = [s["node"] for s in json.load(sys.stdin)["shards"][:4]]
status = json.loads(subprocess.run([".venv/bin/tfgrid", "devnet", "status", "--json"],
                                   capture_output=True, check=True, text=True).stdout)
print(" ".join(n["name"] for n in status["nodes"] if n["id"] in placed))')
say "# 4 of those 20 nodes down: any 16 shards give the file back"
for n in $lost; do run devnet stop "$n"; done
run storage get "$cap" -o "$DEMO_DIR-back.bin"
cmp "$DEMO_DIR-file.bin" "$DEMO_DIR-back.bin" && echo "identical"
run storage check "$cap"
run storage repair "$cap"          # the 4 lost shards regenerated on replacement nodes
run storage check "$cap"
for n in $lost; do run devnet start "$n"; done
run storage rm "$cap"              # every shard on every node, the retired ones too
run devnet status

if [ "${KEEP:-0}" = 1 ]; then
    echo
    echo "The grid keeps running. Use it with:  export TFGRID_HOME=$DEMO_DIR"
    echo "Stop it with:  .venv/bin/tfgrid devnet down --dir $DEMO_DIR"
fi
