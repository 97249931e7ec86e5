#!/usr/bin/env bash
# Usage: scripts/arm64-sysroot.sh DIR
#
# Makes DIR an arm64 (aarch64) sysroot for `farmgate image build --arch aarch64
# --sysroot DIR`: downloads Debian's arm64 packages of the DUT image with
# `apt-get download` (nothing is installed on the host) and extracts them into DIR with
# `dpkg-deb -x`. The packages are the kernel (the versioned package linux-image-arm64
# depends on), busybox-static, crun, the cache partition's tools (e2fsprogs for
# mkfs.ext4, fdisk for sfdisk, util-linux for partx and mkswap, mount for swapon) and,
# recursively, the libraries they depend on (Depends and Pre-Depends whose package name
# starts with "lib"; other dependencies such as debconf or *-base are not followed).
#
# Needs the arm64 architecture in dpkg (`dpkg --add-architecture arm64 && apt-get
# update`, done here when missing and run as root). Idempotent: .deb files already in
# DIR/.debs are not downloaded again and packages already extracted are not extracted
# again; prints what it does.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
debs="$dir/.debs"
done_dir="$dir/.extracted"
mkdir -p "$debs" "$done_dir"

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "arm64-sysroot: dpkg has no arm64 architecture; run as root, or first: dpkg --add-architecture arm64 && apt-get update" >&2
        exit 1
    fi
    echo "arm64-sysroot: adding the arm64 architecture to dpkg (dpkg --add-architecture arm64; apt-get update)"
    dpkg --add-architecture arm64
    apt-get update -qq
fi
if ! apt-cache show linux-image-arm64:arm64 >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "arm64-sysroot: no arm64 package lists yet: apt-get update"
        apt-get update -qq
    fi
    if ! apt-cache show linux-image-arm64:arm64 >/dev/null 2>&1; then
        echo "arm64-sysroot: apt knows no linux-image-arm64:arm64 (run apt-get update)" >&2
        exit 1
    fi
fi

# The versioned kernel package (e.g. linux-image-6.1.0-56-arm64).
kernel_pkg="$(apt-cache depends linux-image-arm64:arm64 |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^:]*\)\(:arm64\)\{0,1\}$/\1/p' | head -n1)"
if [ -z "$kernel_pkg" ]; then
    echo "arm64-sysroot: cannot resolve the kernel package linux-image-arm64 depends on" >&2
    exit 1
fi
echo "arm64-sysroot: kernel package $kernel_pkg"

roots=(busybox-static crun e2fsprogs fdisk util-linux mount libc6)

# The library packages (lib*) the given packages depend on: first alternative of each
# Depends/Pre-Depends, virtual packages (<...>) skipped. One apt-cache call per level.
lib_deps() {
    local args=()
    for p in "$@"; do args+=("$p:arm64"); done
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "${args[@]}" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^<][^ ]*\)$/\2/p' |
        sed 's/:arm64$//;s/:any$//' |
        grep '^lib' | sort -u || true
}

declare -A seen=()
pkgs=("$kernel_pkg")
level=("${roots[@]}")
while [ ${#level[@]} -gt 0 ]; do
    for p in "${level[@]}"; do
        seen[$p]=1
        pkgs+=("$p")
    done
    next=()
    for d in $(lib_deps "${level[@]}"); do
        [ -n "${seen[$d]:-}" ] || next+=("$d")
    done
    level=("${next[@]}")
done
echo "arm64-sysroot: ${#pkgs[@]} packages: ${pkgs[*]}"

# Candidate versions of all packages at once.
declare -A version=()
policy_args=()
for p in "${pkgs[@]}"; do policy_args+=("$p:arm64"); done
while read -r p v; do
    version[$p]="$v"
done < <(apt-cache policy "${policy_args[@]}" |
    awk '/^[^ ].*:$/ {sub(/:$/, ""); sub(/:arm64$/, ""); pkg=$0}
         /^ *Candidate:/ {print pkg, $2}')

for p in "${pkgs[@]}"; do
    ver="${version[$p]:-}"
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
        echo "arm64-sysroot: no candidate version of $p:arm64" >&2
        exit 1
    fi
    # apt-get download names files <pkg>_<version with ':' as %3a>_arm64.deb.
    deb="$debs/${p}_${ver//:/%3a}_arm64.deb"
    if [ -f "$deb" ]; then
        echo "arm64-sysroot: have $(basename "$deb")"
    else
        echo "arm64-sysroot: downloading $p:arm64 $ver"
        (cd "$debs" && apt-get download -qq "$p:arm64=$ver" 2>&1 |
            grep -v 'unsandboxed as root' || true)
        if [ ! -f "$deb" ]; then
            echo "arm64-sysroot: download of $p:arm64 $ver did not produce $deb" >&2
            exit 1
        fi
    fi
    marker="$done_dir/$(basename "$deb")"
    if [ -f "$marker" ]; then
        echo "arm64-sysroot: $p already extracted"
    else
        echo "arm64-sysroot: extracting $(basename "$deb")"
        dpkg-deb -x "$deb" "$dir"
        touch "$marker"
    fi
done

# The kernel package ships no modules.dep (its postinst runs depmod on a real system):
# make it with the host's depmod (kmod reads modules of any architecture).
for mdir in "$dir"/lib/modules/*/; do
    [ -d "$mdir" ] || continue
    kver="$(basename "$mdir")"
    if [ -f "$mdir/modules.dep" ]; then
        echo "arm64-sysroot: $kver has modules.dep"
    elif command -v depmod >/dev/null 2>&1 || [ -x /sbin/depmod ]; then
        echo "arm64-sysroot: depmod -b $dir $kver"
        PATH="$PATH:/sbin:/usr/sbin" depmod -b "$dir" "$kver"
    else
        echo "arm64-sysroot: depmod (kmod) is missing: cannot make $mdir/modules.dep" >&2
        exit 1
    fi
done

# Debian 12 keeps /bin, /sbin and /lib as real directories inside the packages (the
# merged-/usr symlinks are made by base-files on a real system): nothing to fix here,
# the image builder looks in both /lib and /usr/lib.
kernel="$(ls "$dir"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)"
echo "arm64-sysroot: done: $dir (kernel ${kernel:-MISSING}, $(du -sh --exclude=.debs "$dir" | cut -f1) extracted)"
