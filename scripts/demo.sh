#!/usr/bin/env bash
# The main job: a gateway with a farm of virtual machines, then a sample job run with
# farmctl, its console streamed live. Exits with the job's status.
#
# With QEMU and a kernel installed (scripts/setup.sh installs them): a `qemu` virtual
# PDU with 2 ports. Each machine is enrolled the CI-tron way: a discovery powers its
# port, it netboots the default configuration (the Debian kernel + farmgate's test
# initramfs, built here by farmgate-mkinitramfs), registers itself, trains, then runs
# examples/qemu-job.yml.j2. Without QEMU (DEMO=sim): the simulated farm (farm-sim: a
# virtual PDU whose machines are simulated, consoles on ptys) and
# examples/sample-job.yml.j2.
#
# Ports (override with the variables): API 8000, SALAD 8005, network consoles 8100,
# virtual PDU 9191 (sim only), TFTP 6969, S3 9000, registry cache 8002.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins --quiet

API_PORT=${API_PORT:-8000}
SALAD_PORT=${SALAD_PORT:-8005}
CONSOLE_PORT=${CONSOLE_PORT:-8100}
VPDU_PORT=${VPDU_PORT:-9191}
TFTP_PORT=${TFTP_PORT:-6969}
S3_PORT=${S3_PORT:-9000}
REGISTRY_PORT=${REGISTRY_PORT:-8002}
if [ -z "${DEMO:-}" ]; then
    if command -v qemu-system-x86_64 >/dev/null && ls /boot/vmlinuz-* >/dev/null 2>&1; then
        DEMO=qemu
    else
        DEMO=sim
    fi
fi
work=$(mktemp -d /tmp/farmgate-demo.XXXXXX)
bin=target/debug
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # QEMU machines are daemons, like powered machines: switch them off.
    for f in "$work"/qemu/*.pid; do
        [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    echo "demo: logs and state kept in $work"
}
trap cleanup EXIT

export FARMGATE_TOKEN=demo-submit-token FARMGATE_URL="http://127.0.0.1:$API_PORT"
ADMIN=demo-admin-token
common_env=(FARM_NAME=demo EXECUTOR_HOST=127.0.0.1 EXECUTOR_PORT="$API_PORT"
    SALAD_PORT="$SALAD_PORT" SALAD_URL="http://127.0.0.1:$SALAD_PORT"
    SALAD_TCPCONSOLE_PORT="$CONSOLE_PORT" MARS_DB_FILE="$work/mars_db.yaml"
    FARMGATE_STATE_DIR="$work/state" FARMGATE_ADMIN_TOKEN="$ADMIN"
    FARMGATE_SUBMIT_TOKEN="$FARMGATE_TOKEN" BOOTS_TFTP_PORT="$TFTP_PORT"
    BOOTS_TFTP_ROOT="$work/tftp" FARMGATE_DEFAULT_PDU_OFF_DELAY=1
    FARMGATE_S3_PORT="$S3_PORT" FARMGATE_REGISTRY_PORT="$REGISTRY_PORT")

wait_api() {
    for _ in $(seq 100); do
        "$bin/farmctl" duts >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "demo: the gateway did not start; see $work/farmgate.log" >&2
    exit 1
}

if [ "$DEMO" = qemu ]; then
    echo "== building the DUTs' kernel + initramfs from host packages"
    "$bin/farmgate-mkinitramfs" --out "$work/tftp"
    # QEMU's user-mode network shows the host as 10.42.0.1 to the machines.
    gw="http://10.42.0.1:$API_PORT"
    cat >"$work/mars_db.yaml" <<YAML
pdus:
  QEMU:
    driver: qemu
    config:
      ports: 2
      memory: 512
      state_dir: $work/qemu
duts: {}
YAML
    env "${common_env[@]}" EXECUTOR_URL="$gw" \
        SERGENT_HARTMAN_BOOT_COUNT=2 SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT=2 \
        BOOTS_DEFAULT_KERNEL="$gw/boot/vmlinuz" \
        BOOTS_DEFAULT_INITRD="$gw/boot/initramfs.cpio.gz" \
        BOOTS_DEFAULT_CMDLINE="console=ttyS0 panic=-1 farmgate.register=$gw" \
        "$bin/farmgate" serve >"$work/farmgate.log" 2>&1 &
    pids+=($!)
    wait_api
    for port in 0 1; do
        echo "== enrolling QEMU port $port: discovery, netboot, registration"
        curl -sf -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
            -d "{\"pdu\": \"QEMU\", \"port_id\": $port, \"timeout\": 240}" \
            "$FARMGATE_URL/api/v1/dut/discover" >/dev/null
        mac=$(printf '52:54:00:11:22:%02x' "$port")
        for _ in $(seq 2400); do
            curl -sf "$FARMGATE_URL/api/v1/dut/$mac" >/dev/null && break
            sleep 0.1
        done
    done
    echo "== the farm: two registered machines, training (2 boot-loop rounds each)"
    "$bin/farmctl" duts
    job=examples/qemu-job.yml.j2
    # The registration tags machines by their hardware (virtio:family:VIRTIO, ...).
    run_args=(-t virtio:family:VIRTIO)
else
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
    env "${common_env[@]}" EXECUTOR_URL="http://127.0.0.1:$API_PORT" \
        SALAD_SERIAL_PORTS="$work/tty/ttySIM*" \
        SERGENT_HARTMAN_BOOT_COUNT=3 SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT=3 \
        BOOTS_DEFAULT_KERNEL="http://127.0.0.1:$API_PORT/boot/vmlinuz" BOOTS_DEFAULT_INITRD= \
        BOOTS_DEFAULT_CMDLINE='console=ttyS0 farmsim.script="print boot-loop round ok; poweroff"' \
        "$bin/farmgate" serve >"$work/farmgate.log" 2>&1 &
    pids+=($!)
    wait_api
    echo "== the farm: two new machines, training (3 boot-loop rounds each)"
    "$bin/farmctl" duts
    job=examples/sample-job.yml.j2
    run_args=()
fi

echo "== dashboard: http://127.0.0.1:$API_PORT/ (metrics at /metrics)"
echo "== farmctl run -w ${run_args[*]} $job (waits for a trained machine)"
set +e
"$bin/farmctl" run -w "${run_args[@]}" "$job"
status=$?
set -e
echo "== farmctl exited with $status (0 = PASS)"
"$bin/farmctl" duts
exit $status
