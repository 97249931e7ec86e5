#!/usr/bin/env bash
# The main job: a gateway with a simulated farm (a virtual PDU with 4 machines whose
# consoles are ptys), two machines enrolled and trained by Sergeant Hartman, then a
# sample job run with farmctl, its console streamed live. Exits with the job's status.
#
# Ports (override with the variables): API 8000, SALAD 8005, virtual PDU 9191, TFTP 6969.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins --quiet

API_PORT=${API_PORT:-8000}
SALAD_PORT=${SALAD_PORT:-8005}
VPDU_PORT=${VPDU_PORT:-9191}
TFTP_PORT=${TFTP_PORT:-6969}
work=$(mktemp -d /tmp/farmgate-demo.XXXXXX)
bin=target/debug
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "demo: logs and state kept in $work"
}
trap cleanup EXIT

mkdir -p "$work/tty"
"$bin/farm-sim" --listen "127.0.0.1:$VPDU_PORT" --ports 4 --tty-dir "$work/tty" \
    --gateway-url "http://127.0.0.1:$API_PORT" >"$work/farm-sim.log" 2>&1 &
pids+=($!)

cat >"$work/mars_db.yaml" <<YAML
pdus:
  SIM:
    driver: vpdu
    config:
      hostname: 127.0.0.1:$VPDU_PORT
duts:
  52:54:00:11:22:01:
    base_name: farmsim
    tags: [farmsim, cpu:x86_64]
    pdu: SIM
    pdu_port_id: 1
    pdu_off_delay: 1
    ready_for_service: false
  52:54:00:11:22:02:
    base_name: farmsim
    tags: [farmsim, cpu:x86_64]
    pdu: SIM
    pdu_port_id: 2
    pdu_off_delay: 1
    ready_for_service: false
YAML

export FARMGATE_TOKEN=demo-submit-token
env FARM_NAME=demo EXECUTOR_HOST=127.0.0.1 EXECUTOR_PORT="$API_PORT" \
    EXECUTOR_URL="http://127.0.0.1:$API_PORT" \
    SALAD_PORT="$SALAD_PORT" SALAD_URL="http://127.0.0.1:$SALAD_PORT" \
    SALAD_SERIAL_PORTS="$work/tty/ttySIM*" MARS_DB_FILE="$work/mars_db.yaml" \
    FARMGATE_STATE_DIR="$work/state" FARMGATE_ADMIN_TOKEN=demo-admin-token \
    FARMGATE_SUBMIT_TOKEN="$FARMGATE_TOKEN" \
    BOOTS_TFTP_PORT="$TFTP_PORT" BOOTS_TFTP_ROOT="$work/tftp" \
    SERGENT_HARTMAN_BOOT_COUNT=3 SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT=3 \
    BOOTS_DEFAULT_KERNEL="http://127.0.0.1:$API_PORT/boot/vmlinuz" BOOTS_DEFAULT_INITRD= \
    BOOTS_DEFAULT_CMDLINE='console=ttyS0 farmsim.script="print boot-loop round ok; poweroff"' \
    "$bin/farmgate" serve >"$work/farmgate.log" 2>&1 &
pids+=($!)

export FARMGATE_URL="http://127.0.0.1:$API_PORT"
for _ in $(seq 100); do
    "$bin/farmctl" duts >/dev/null 2>&1 && break
    sleep 0.1
done
echo "== the farm: two new machines, training (3 boot-loop rounds each)"
"$bin/farmctl" duts
echo "== farmctl run -w examples/sample-job.yml.j2 (waits for a trained machine)"
set +e
"$bin/farmctl" run -w examples/sample-job.yml.j2
status=$?
set -e
echo "== farmctl exited with $status (0 = PASS)"
"$bin/farmctl" duts
exit $status
