#!/usr/bin/env bash
# Install what farmgate needs to build and test on a Debian 12 machine with a Rust
# toolchain (rustup, Rust >= 1.85). Idempotent: installs only what is missing.
#
# Besides the build tools: QEMU and its iPXE ROMs (the virtual DUTs), a Debian kernel
# and busybox (farmgate-mkinitramfs builds the DUTs' initramfs from them), and the real
# clients and peers the tests and benchmarks talk to (DHCP and TFTP clients, dnsmasq,
# ser2net), the S3 and registry clients and peers (s3cmd, boto3, aws-cli, moto's S3
# server, skopeo, podman, docker-registry, openssl for test certificates) and net-snmp's
# agent and tools (snmpd, snmpget) for the SNMP PDU drivers, and Chromium with its
# WebDriver for the dashboard's browser tests.
set -euo pipefail

need_apt=()
for pkg in gcc pkg-config curl python3 iproute2 \
    qemu-system-x86 ipxe-qemu ipxe busybox-static linux-image-amd64 \
    udhcpc isc-dhcp-client tftp-hpa dnsmasq-base ser2net python3-boto3 s3cmd \
    skopeo docker-registry podman crun openssl snmpd snmp chromium chromium-driver chrony \
    e2fsprogs fdisk util-linux qemu-utils lz4; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# S3 clients of the object store's tests (aws-cli and boto3 for the python3 on PATH) and
# moto's S3 server, the external store of the remote-mode tests.
if ! python3 -c "import boto3, awscli, moto.server" >/dev/null 2>&1 || ! command -v aws >/dev/null 2>&1; then
    echo "setup: installing aws-cli, boto3 and moto[server] (PyPI)"
    python3 -m pip install --quiet awscli boto3 'moto[server]'
fi

# The dashboard's terminal emulator (npm @xterm/xterm), built into the gateway binary.
ui_dir="$(cd "$(dirname "$0")/.." && pwd)/crates/farmgate-api/ui"
if [ ! -f "$ui_dir/node_modules/@xterm/xterm/lib/xterm.js" ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "setup: installing the dashboard's front-end packages (npm ci)"
        (cd "$ui_dir" && npm ci --no-audit --no-fund --loglevel=error)
    else
        echo "setup: npm is missing: the dashboard will show consoles as plain text" >&2
    fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is missing; install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
