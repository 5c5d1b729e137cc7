#!/usr/bin/env bash
# Same answer on every CPU: run xray-edge on the same image files on several CPUs and compare each
# with this machine's native x86-64 run (the reference).
#
# Targets (--targets, default all; native always runs, as the reference):
#   native   this x86-64 CPU as it is (its AVX2 / AVX-512 VNNI / AMX flags are reported: onnxruntime
#            picks its int8 kernels by them)
#   haswell  x86-64 restricted to AVX2: the same host venv's python under `qemu-x86_64 -cpu Haswell`
#            (user mode; hides AVX-512, so onnxruntime takes its AVX2 int8 kernels)
#   a72, a76 aarch64 Raspberry Pi 4 (Cortex-A72) / Pi 5 (Cortex-A76): a fresh venv in a Debian
#            bookworm arm64 root filesystem (mmdebstrap, cached) run through qemu-aarch64 (binfmt_misc)
#
# Every target installs the wheel built from this checkout (pip wheel --no-deps) with the same
# onnxruntime / numpy / OpenCV versions, and runs deploy/probe_model.py on the same files (lung box,
# model input, probabilities, decision, age output, gate score, by the runtime's own functions;
# where a target's model input differs from the reference's, the model also runs on the
# reference's tensor) and `python -m xray_edge.selfcheck --json` (the shipped models on fixed
# inputs). deploy/compare_probs.py compares them with the reference, tolerances in its docstring
# (lung box exact, inputs 1e-5, probabilities 1e-4, age and gate relative 1e-4, same decision and
# label). Exit 0 only if every target agrees; 1 if one does not; 2 if the check could not run.
#
# Images: N real X-rays from $DATA/cxr3 and $DATA/cxr3-extra (default ../shared/data beside the
# checkout), a fixed seeded pick across origins and classes (deploy/make_images.py); generated
# radiograph-like images only where that data is absent (the input gate rejects those, so they
# prove less).
#
# Usage (as root where an aarch64 target runs: chroot, mounts and binfmt need it):
#   deploy/check-cpus.sh                          # the shipped model, all targets
#   deploy/check-cpus.sh --model PATH.onnx        # any xray-edge model
#   deploy/check-cpus.sh --stand-in               # a small INT8 stand-in (deploy/make_standin.py)
# Options: --images N (8), --targets LIST (native,haswell,a72,a76), --threads N (2), --data DIR,
#   --cache DIR (default ${XDG_CACHE_HOME:-~/.cache}/xray-edge), --rebuild-rootfs, --keep (keep the
#   work folder).
# Needs a Debian/Ubuntu x86-64 host (qemu-user, and for aarch64 qemu-user-static, binfmt-support,
# mmdebstrap, arch-test: installed with apt-get when missing), python3 with venv, network to
# deb.debian.org and PyPI. The first aarch64 run builds the rootfs (~250 MB, a few minutes).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=""   # empty: the shipped model
STAND_IN=0
N_IMAGES=8
TARGETS=native,haswell,a72,a76
THREADS=2
DATA="$REPO/../shared/data"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/xray-edge"
REBUILD=0
KEEP=0
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
ROOT_PACKAGES=python3,python3-venv

log() { printf '\n== %s\n' "$*"; }
die() { printf 'check-cpus: error: %s\n' "$*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL=$(realpath -m "${2:?--model needs a path}")
      [[ -f $MODEL ]] || die "model $MODEL not found"; shift 2 ;;
    --stand-in) STAND_IN=1; shift ;;
    --images) N_IMAGES=${2:?}; shift 2 ;;
    --targets) TARGETS=${2:?}; shift 2 ;;
    --threads) THREADS=${2:?}; shift 2 ;;
    --data) DATA=$(realpath -m "${2:?}"); shift 2 ;;
    --cache) CACHE=$(realpath -m "${2:?}"); shift 2 ;;
    --rebuild-rootfs) REBUILD=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ $N_IMAGES =~ ^[1-9][0-9]*$ ]] || die "--images must be a positive number"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive number"
[[ -n $MODEL && $STAND_IN -eq 1 ]] && die "give --model or --stand-in, not both"
[[ $(uname -m) == x86_64 ]] || die "the reference is native x86-64: run this on an x86-64 host"
OTHERS=()   # the targets compared with native, in the order given
IFS=, read -ra asked <<<"$TARGETS"
for t in "${asked[@]}"; do
  case "$t" in
    native) ;;
    haswell|a72|a76) [[ " ${OTHERS[*]} " == *" $t "* ]] || OTHERS+=("$t") ;;
    *) die "unknown target '$t' (use native, haswell, a72, a76)" ;;
  esac
done
[[ ${#OTHERS[@]} -gt 0 ]] || die "nothing to compare native with: --targets needs haswell, a72 or a76"
HASWELL=0 ARM=0
[[ " ${OTHERS[*]} " == *" haswell "* ]] && HASWELL=1
[[ " ${OTHERS[*]} " == *" a7"* ]] && ARM=1
[[ $ARM -eq 0 || $EUID -eq 0 ]] || die "run as root for the aarch64 targets (chroot, mounts and binfmt_misc need it)"

log "host tools"
needed=(git:git)
[[ $HASWELL -eq 1 ]] && needed+=(qemu-x86_64:qemu-user)
[[ $ARM -eq 1 ]] && needed+=(qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support
                             mmdebstrap:mmdebstrap arch-test:arch-test)
missing=()
for tool in "${needed[@]}"; do command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null || die "install ${missing[*]} (Debian package names) first"
  echo "installing ${missing[*]} with apt-get"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

WORK=$(mktemp -d /tmp/xray-edge-cpus.XXXXXX)
ROOTFS="$CACHE/arm64-rootfs"
INSIDE=/tmp/xray-edge-check   # $WORK's counterpart inside the rootfs
cleanup() {
  if [[ $KEEP -eq 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK" "${ROOTFS:?}$INSIDE"; fi
}
trap cleanup EXIT

log "build the xray-edge wheel from $REPO; host venv"
mkdir -p "$CACHE" "$WORK/src" "$WORK/dist"
# the checkout as git sees it (committed or not, minus ignored files such as venvs and builds)
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf -) | tar -C "$WORK/src" -xf -
HOSTVENV="$CACHE/x86_64-venv"
[[ -x $HOSTVENV/bin/python ]] || python3 -m venv "$HOSTVENV"
HOSTPY="$HOSTVENV/bin/python"
"$HOSTPY" -m pip wheel -qq --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK/dist"/xray_edge-*.whl)
"$HOSTPY" -m pip install -qq "$WHEEL" onnx   # onnx: only for the stand-in
"$HOSTPY" -m pip install -qq --no-deps --force-reinstall "$WHEEL"
PINS=$("$HOSTPY" -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('onnxruntime', 'numpy', 'opencv-python-headless')))")
echo "$(basename "$WHEEL"); on every target: $PINS"

ROOTS=()
for r in cxr3 cxr3-extra; do [[ -d $DATA/$r ]] && ROOTS+=("$DATA/$r"); done
if [[ ${#ROOTS[@]} -gt 0 ]]; then
  log "$N_IMAGES real images from ${ROOTS[*]}"
  "$HOSTPY" "$REPO/deploy/make_images.py" "$WORK/images" "$N_IMAGES" --data "${ROOTS[@]}" || die "cannot pick the images"
else
  log "$N_IMAGES GENERATED images: no data at $DATA/cxr3 or $DATA/cxr3-extra (the gate rejects these; they prove less)"
  "$HOSTPY" "$REPO/deploy/make_images.py" "$WORK/images" "$N_IMAGES"
fi

if [[ $STAND_IN -eq 1 ]]; then
  MODEL="$WORK/xray-edge-standin-int8.onnx"
  log "INT8 stand-in model, calibrated on these images"
  "$HOSTPY" "$REPO/deploy/make_standin.py" "$MODEL" --calibration "$WORK/images" 2>&1 | grep -v '^WARNING:root' \
    || die "cannot make the stand-in"
fi
MODEL_ARGS=()
if [[ -n $MODEL ]]; then
  MODEL_ARGS=(--model "$MODEL")
  log "model $MODEL (sha256 $(sha256sum "$MODEL" | cut -c1-16))"
else
  log "the shipped model"
fi

declare -A SECONDS_OF
# Run the probe and the selfcheck of target $1 with the python command that follows; the
# selfcheck runs where the reference's did (it costs 4 images' inference).
run_target() {
  local name=$1 start=$SECONDS; shift
  local ref=()
  [[ $name == native ]] || ref=(--reference-inputs "$WORK/native.npz")
  "$@" "$REPO/deploy/probe_model.py" "$WORK/images" --out "$WORK/$name" --threads "$THREADS" \
    "${MODEL_ARGS[@]}" "${ref[@]}" || die "$name: the probe failed"
  if [[ $name == native || -f $WORK/native-selfcheck.json ]]; then
    "$@" -m xray_edge.selfcheck --json >"$WORK/$name-selfcheck.json" 2>"$WORK/$name-selfcheck.err" \
      || rm "$WORK/$name-selfcheck.json"
  fi
  SECONDS_OF[$name]=$((SECONDS - start))
  echo "$name: $((SECONDS - start)) s"
}

log "native x86-64 (the reference)"
FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
INT8=()
for f in avx2 avx512f avx512_vnni avx_vnni amx_int8; do [[ $FLAGS == *" $f "* ]] && INT8+=("$f"); done
echo "CPU: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | xargs); int8-relevant flags: ${INT8[*]:-none}"
if [[ $FLAGS == *" avx512_vnni "* || $FLAGS == *" avx_vnni "* || $FLAGS == *" amx_int8 "* ]]; then
  echo "onnxruntime takes VNNI/AMX int8 kernels here (exact sums)"
else
  echo "no VNNI/AMX: onnxruntime takes its AVX2 int8 kernels here too (native and haswell test the same path)"
fi
run_target native "$HOSTPY"

if [[ $HASWELL -eq 1 ]]; then
  log "x86-64 AVX2 only: qemu-x86_64 -cpu Haswell ($(qemu-x86_64 --version | head -1))"
  haswell() { qemu-x86_64 -cpu Haswell "$@" 2> >(grep -v "^qemu-x86_64: warning: TCG doesn't support" >&2); }
  run_target haswell haswell "$HOSTPY"
fi

if [[ $ARM -eq 1 ]]; then
  log "binfmt_misc (runs arm64 programs through qemu)"
  BINFMT=/proc/sys/fs/binfmt_misc
  if [[ ! -e $BINFMT/register ]]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" \
      || die "binfmt_misc is not available in this kernel/container; cannot run an arm64 chroot here"
  fi
  [[ -e $BINFMT/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64 || true
  grep -qx enabled "$BINFMT/qemu-aarch64" 2>/dev/null \
    || die "no enabled qemu-aarch64 binfmt handler (try: update-binfmts --enable qemu-aarch64)"
  INTERPRETER=$(sed -n 's/^interpreter //p' "$BINFMT/qemu-aarch64")
  BINFMT_FLAGS=$(sed -n 's/^flags: //p' "$BINFMT/qemu-aarch64")
  echo "qemu-aarch64 handler: $INTERPRETER (flags: $BINFMT_FLAGS); $(qemu-aarch64-static --version | head -1)"

  ROOT_ID="$SUITE arm64 $ROOT_PACKAGES"
  log "Debian $SUITE arm64 root filesystem: $ROOTFS"
  if [[ $REBUILD -eq 1 || "$(cat "$ROOTFS/.xray-edge-rootfs" 2>/dev/null)" != "$ROOT_ID" ]]; then
    rm -rf "$ROOTFS" "$ROOTFS.tmp"
    mmdebstrap --quiet --mode=root --arch=arm64 --variant=apt --include="$ROOT_PACKAGES" \
      "$SUITE" "$ROOTFS.tmp" "$MIRROR" || die "mmdebstrap could not build the rootfs"
    echo "$ROOT_ID" > "$ROOTFS.tmp/.xray-edge-rootfs"
    mv "$ROOTFS.tmp" "$ROOTFS"
  else
    echo "cached ($(du -sh "$ROOTFS" | cut -f1)); --rebuild-rootfs to rebuild"
  fi
  if [[ $BINFMT_FLAGS != *F* ]]; then  # without the "fix binary" flag the interpreter must exist in the chroot
    mkdir -p "$ROOTFS$(dirname "$INTERPRETER")"
    cp "$(readlink -f "$INTERPRETER")" "$ROOTFS$INTERPRETER"
  fi

  # Run a bash script inside the arm64 rootfs under qemu with CPU model $1. Own mount namespace
  # (mounts vanish when it ends); /proc/cpuinfo and /sys CPU lists are those of the board (qemu-user
  # would show the host's x86 /proc/cpuinfo, which crashes onnxruntime's cpuinfo).
  in_arm64() {
    local cpu=$1 part rev features fake="$WORK/board-$1"
    case "$cpu" in
      cortex-a72) part=0xd08; rev=3; features="fp asimd evtstrm crc32 cpuid" ;;
      cortex-a76) part=0xd0b; rev=1
        features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    esac
    mkdir -p "$fake"
    for i in 0 1 2 3; do
      printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
        "$i" "$features" "$part" "$rev"
    done > "$fake/cpuinfo"
    unshare --mount --propagation private bash -euc '
      root=$1 fake=$2; shift 2
      mount -t proc proc "$root/proc"
      mount --bind "$fake/cpuinfo" "$root/proc/cpuinfo"
      mount -t tmpfs tmpfs "$root/sys"
      mkdir -p "$root/sys/devices/system/cpu"
      for f in possible present online; do echo 0-3 > "$root/sys/devices/system/cpu/$f"; done
      mount --rbind /dev "$root/dev"
      exec "$@"' _ "$ROOTFS" "$fake" \
      env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$cpu" \
      "$(command -v chroot)" "$ROOTFS" /bin/bash -euo pipefail -c "$2"
  }

  read -r ARM_MACHINE ARM_PYVER ARM_GLIBC <<<"$(in_arm64 cortex-a72 \
    'python3 -c "import platform, sys; print(platform.machine(), \"%d.%d\" % sys.version_info[:2], platform.libc_ver()[1])"')"
  [[ $ARM_MACHINE == aarch64 ]] || die "the rootfs python reports machine '$ARM_MACHINE', not aarch64"

  log "aarch64 wheels (python $ARM_PYVER, glibc $ARM_GLIBC) from PyPI; a fresh venv in the rootfs"
  WHEELS="$CACHE/wheels-arm64"
  mkdir -p "$WHEELS"
  PLATFORMS=()
  for minor in $(seq "${ARM_GLIBC#2.}" -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
  PLATFORMS+=(--platform manylinux2014_aarch64 --platform linux_aarch64)
  "$HOSTPY" -m pip download -qq --only-binary=:all: "${PLATFORMS[@]}" --implementation cp \
    --python-version "$ARM_PYVER" --abi "cp${ARM_PYVER/./}" -d "$WHEELS" "$WHEEL" $PINS \
    || die "cannot download the aarch64 wheels"
  rm -f "$WHEELS"/xray_edge-*.whl   # the wheel under test comes from $WORK/dist, never from the cache
  rm -rf "${ROOTFS:?}$INSIDE"
  mkdir -p "$ROOTFS$INSIDE"
  cp -r "$WORK/dist" "$WORK/images" "$WHEELS" "$REPO/deploy/probe_model.py" "$ROOTFS$INSIDE/"
  cp "$WORK/native.npz" "$ROOTFS$INSIDE/"
  ARM_MODEL=()
  [[ -n $MODEL ]] && { cp "$MODEL" "$ROOTFS$INSIDE/model.onnx"; ARM_MODEL=(--model model.onnx); }
  start=$SECONDS
  in_arm64 cortex-a72 "
    cd $INSIDE
    rm -rf /opt/xray-edge
    python3 -m venv /opt/xray-edge
    /opt/xray-edge/bin/pip install --quiet --no-index --find-links $(basename "$WHEELS") dist/$(basename "$WHEEL") $PINS
    /opt/xray-edge/bin/xray-edge classify --help >/dev/null"   # the installed command runs
  echo "installed in $((SECONDS - start)) s under emulation"

  for t in "${OTHERS[@]}"; do
    [[ $t == a7* ]] || continue
    cpu=cortex-${t}
    log "aarch64 $cpu ($([[ $t == a72 ]] && echo "Raspberry Pi 4" || echo "Raspberry Pi 5"), emulated)"
    start=$SECONDS
    selfcheck=":"
    [[ -f $WORK/native-selfcheck.json ]] && selfcheck="/opt/xray-edge/bin/python -m xray_edge.selfcheck --json \
      >$t-selfcheck.json 2>$t-selfcheck.err || rm $t-selfcheck.json"
    in_arm64 "$cpu" "
      cd $INSIDE
      /opt/xray-edge/bin/python probe_model.py images --out $t --threads $THREADS ${ARM_MODEL[*]} \
        --reference-inputs native.npz
      $selfcheck" || die "$t: the probe failed under emulation"
    cp "$ROOTFS$INSIDE/$t".{json,npz} "$WORK/"
    cp "$ROOTFS$INSIDE/$t"-selfcheck.* "$WORK/" 2>/dev/null || true
    SECONDS_OF[$t]=$((SECONDS - start))
    echo "$t: ${SECONDS_OF[$t]} s"
  done
fi

log "compare with native"
OPTIONAL=()
[[ -n $MODEL ]] && OPTIONAL=(--selfcheck-optional)   # the shipped models' selfcheck is an extra here
status=0
"$HOSTPY" "$REPO/deploy/compare_probs.py" "$WORK/native" "${OTHERS[@]/#/$WORK/}" "${OPTIONAL[@]}" || status=$?
printf 'time per target (probe + selfcheck; emulated ones are no speed figure):'
for t in native "${OTHERS[@]}"; do printf ' %s %s s' "$t" "${SECONDS_OF[$t]}"; done
echo
exit $status
