#!/usr/bin/env bash
# Prove that `xray-edge classify` works on 64-bit ARM (Raspberry Pi OS Bookworm = Debian bookworm
# arm64) and gives the same probabilities as on x86-64.
#
# 1. builds the xray-edge wheel from this checkout (pip wheel --no-deps) and installs it, with its
#    runtime dependencies, into a host (x86-64) venv;
# 2. downloads the aarch64 wheels of the same dependency versions from PyPI (pip download
#    --platform ..._aarch64) and installs the wheel offline into a fresh venv inside a cached
#    Debian bookworm arm64 root filesystem (mmdebstrap), run through qemu user-mode emulation
#    (binfmt_misc) with the CPU model of a Pi 4 (Cortex-A72) or Pi 5 (Cortex-A76);
# 3. runs `xray-edge classify` on the same generated images (deploy/make_images.py) with the same
#    model on both sides, and compares (deploy/compare_probs.py): 1. the preprocessed model inputs
#    (tolerance 1e-5), 2. the model's probabilities for the very same input tensors
#    (deploy/probe_model.py), 3. classify's probabilities and predicted classes end to end
#    (int8: one output quantisation level of the model, 0.057 for the shipped one; fp16 0.001;
#    fp32 0.0001; why: see compare_probs.py). Exit 0 only if all three pass.
#
# Usage (as root: chroot, mounts and binfmt need it):
#   deploy/check-aarch64.sh                         # the shipped model runtime/models/xray-edge-vgg19-int8.onnx
#   deploy/check-aarch64.sh --model PATH.onnx       # any xray-edge model
#   deploy/check-aarch64.sh --stand-in              # a small INT8 stand-in (deploy/make_standin.py)
# Options: --images N (4), --cpu cortex-a72|cortex-a76 (cortex-a72), --threads N (2), --tol X
#   (probability tolerance for 2 and 3; default by model variant), --cache DIR (default
#   ${XDG_CACHE_HOME:-~/.cache}/xray-edge), --rebuild-rootfs, --keep (keep the work folder).
# Needs a Debian/Ubuntu x86-64 host (qemu-user-static, binfmt-support, mmdebstrap, arch-test are installed
# with apt-get when missing), python3 with venv, network to deb.debian.org and PyPI.
# The first run builds the rootfs (~250 MB, a few minutes); later runs reuse it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL="$REPO/runtime/models/xray-edge-vgg19-int8.onnx"
STAND_IN=0
N_IMAGES=4
CPU=cortex-a72
THREADS=2
TOL=()
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/xray-edge"
REBUILD=0
KEEP=0
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
ROOT_PACKAGES=python3,python3-venv

log() { printf '\n== %s\n' "$*"; }
die() { printf 'check-aarch64: error: %s\n' "$*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL=$(realpath -m "${2:?--model needs a path}"); shift 2 ;;
    --stand-in) STAND_IN=1; shift ;;
    --images) N_IMAGES=${2:?}; shift 2 ;;
    --cpu) CPU=${2:?}; shift 2 ;;
    --threads) THREADS=${2:?}; shift 2 ;;
    --tol) TOL=(--tol "${2:?}"); shift 2 ;;
    --cache) CACHE=$(realpath -m "${2:?}"); shift 2 ;;
    --rebuild-rootfs) REBUILD=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$CPU" in
  cortex-a72) BOARD="Raspberry Pi 4 (Cortex-A72)"; CPU_PART=0xd08; CPU_REV=3
    CPU_FEATURES="fp asimd evtstrm crc32 cpuid" ;;
  cortex-a76) BOARD="Raspberry Pi 5 (Cortex-A76)"; CPU_PART=0xd0b; CPU_REV=1
    CPU_FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
  *) die "--cpu must be cortex-a72 (Pi 4) or cortex-a76 (Pi 5), got $CPU" ;;
esac
[[ $N_IMAGES =~ ^[1-9][0-9]*$ ]] || die "--images must be a positive number"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive number"
[[ $EUID -eq 0 ]] || die "run as root (chroot, mounts and binfmt_misc need it)"
[[ $(uname -m) == x86_64 ]] || die "this compares x86-64 with emulated aarch64; run it on an x86-64 host"

log "host tools"
missing=()
for tool in qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support mmdebstrap:mmdebstrap arch-test:arch-test git:git; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  command -v apt-get >/dev/null || die "install ${missing[*]} (Debian package names) first"
  echo "installing ${missing[*]} with apt-get"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
qemu-aarch64-static --version | head -1

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
FLAGS=$(sed -n 's/^flags: //p' "$BINFMT/qemu-aarch64")
echo "qemu-aarch64 handler: $INTERPRETER (flags: $FLAGS)"

mkdir -p "$CACHE"
ROOTFS="$CACHE/arm64-rootfs"
ROOT_ID="$SUITE arm64 $ROOT_PACKAGES"
log "Debian $SUITE arm64 root filesystem: $ROOTFS"
if [[ $REBUILD -eq 1 || "$(cat "$ROOTFS/.xray-edge-rootfs" 2>/dev/null)" != "$ROOT_ID" ]]; then
  rm -rf "$ROOTFS" "$ROOTFS.tmp"
  time mmdebstrap --quiet --mode=root --arch=arm64 --variant=apt --include="$ROOT_PACKAGES" \
    "$SUITE" "$ROOTFS.tmp" "$MIRROR"
  echo "$ROOT_ID" > "$ROOTFS.tmp/.xray-edge-rootfs"
  mv "$ROOTFS.tmp" "$ROOTFS"
else
  echo "cached ($(du -sh "$ROOTFS" | cut -f1)); --rebuild-rootfs to rebuild"
fi
if [[ $FLAGS != *F* ]]; then  # without the "fix binary" flag the interpreter must exist in the chroot
  mkdir -p "$ROOTFS$(dirname "$INTERPRETER")"
  cp "$(readlink -f "$INTERPRETER")" "$ROOTFS$INTERPRETER"
fi

WORK=$(mktemp -d /tmp/xray-edge-aarch64.XXXXXX)
INSIDE=/tmp/xray-edge-check   # $WORK's counterpart inside the rootfs
cleanup() {
  if [[ $KEEP -eq 1 ]]; then echo "kept $WORK and $ROOTFS$INSIDE"; else rm -rf "$WORK" "$ROOTFS$INSIDE"; fi
}
trap cleanup EXIT

# Run a bash script inside the arm64 rootfs under qemu with the chosen CPU model. Own mount
# namespace (mounts vanish when it ends); /proc/cpuinfo and /sys CPU lists are those of the board
# (qemu-user would show the host's x86 /proc/cpuinfo, which crashes onnxruntime's cpuinfo).
in_arm64() {
  local fake="$WORK/board"
  mkdir -p "$fake"
  for i in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$i" "$CPU_FEATURES" "$CPU_PART" "$CPU_REV"
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
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$CPU" \
    "$(command -v chroot)" "$ROOTFS" /bin/bash -euo pipefail -c "$1"
}

ARM_PY=$(in_arm64 'python3 -c "import platform, sys; print(platform.machine(), \"%d.%d\" % sys.version_info[:2], platform.libc_ver()[1])"')
read -r ARM_MACHINE ARM_PYVER ARM_GLIBC <<<"$ARM_PY"
[[ $ARM_MACHINE == aarch64 ]] || die "the rootfs python reports machine '$ARM_MACHINE', not aarch64"
echo "rootfs python: $ARM_PYVER on $ARM_MACHINE, glibc $ARM_GLIBC; emulated CPU: $CPU = $BOARD"

log "build the xray-edge wheel from $REPO"
mkdir -p "$WORK/src" "$WORK/dist"
# the checkout as git sees it (committed or not, minus ignored files such as venvs and builds)
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf -) | tar -C "$WORK/src" -xf -
HOSTVENV="$CACHE/x86_64-venv"
[[ -x $HOSTVENV/bin/python ]] || python3 -m venv "$HOSTVENV"
HOSTPY="$HOSTVENV/bin/python"
"$HOSTPY" -m pip wheel -qq --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK/dist"/xray_edge-*.whl)
echo "$(basename "$WHEEL")"

log "x86-64 install (host venv $HOSTVENV)"
"$HOSTPY" -m pip install -qq "$WHEEL" onnx   # onnx: only for the MAC count and stand-in helpers
"$HOSTPY" -m pip install -qq --no-deps --force-reinstall "$WHEEL"
PINS=$("$HOSTPY" -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('onnxruntime', 'numpy', 'opencv-python-headless')))")
echo "pinned on both sides: $PINS"

if [[ $STAND_IN -eq 1 ]]; then
  MODEL="$WORK/xray-edge-standin-int8.onnx"
  log "INT8 stand-in model"
  "$HOSTPY" "$REPO/deploy/make_standin.py" "$MODEL" 2>&1 | grep -v '^WARNING:root' || true
fi
[[ -f $MODEL ]] || die "model $MODEL not found (train and export it, or pass --model PATH / --stand-in)"
log "model $MODEL"
sha256sum "$MODEL" | cut -c1-16
"$HOSTPY" -m xray_edge.benchmarks.macs "$MODEL"

log "$N_IMAGES generated test images"
"$HOSTPY" "$REPO/deploy/make_images.py" "$WORK/images" "$N_IMAGES"

log "aarch64 wheels (python $ARM_PYVER, glibc $ARM_GLIBC) from PyPI"
WHEELS="$CACHE/wheels-arm64"
mkdir -p "$WHEELS"
PLATFORMS=()
for minor in $(seq "${ARM_GLIBC#2.}" -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
PLATFORMS+=(--platform manylinux2014_aarch64 --platform linux_aarch64)
"$HOSTPY" -m pip download -qq --only-binary=:all: "${PLATFORMS[@]}" --implementation cp \
  --python-version "$ARM_PYVER" --abi "cp${ARM_PYVER/./}" -d "$WHEELS" "$WHEEL" $PINS
rm -f "$WHEELS"/xray_edge-*.whl   # the wheel under test comes from $WORK/dist, never from the cache
ls "$WHEELS" | grep -E '^(onnxruntime|numpy|opencv)' || true

log "x86-64: classify, then the model on its own preprocessed inputs"
(cd "$WORK" && "$HOSTPY" - "$HOSTVENV/bin/xray-edge" classify images --model "$MODEL" --threads "$THREADS" \
  --quiet --output x86_64.csv <<'EOF'
"""Run the command given and report its peak resident memory (RSS)."""
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(f"peak RSS of classify on x86-64: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
sys.exit(0 if rc == 1 else rc)  # 1: some files rejected by the gate or unreadable; their rows are compared too
EOF
)
"$HOSTPY" "$REPO/deploy/probe_model.py" "$MODEL" --images "$WORK/images" --threads "$THREADS" \
  --save-inputs "$WORK/x86_64-inputs.npz" --output "$WORK/x86_64-model.csv"

log "aarch64: fresh venv, runtime install, classify, model on x86-64's inputs (qemu, $CPU)"
mkdir -p "$ROOTFS$INSIDE"
cp -r "$WORK/dist" "$WORK/images" "$ROOTFS$INSIDE/"
cp "$MODEL" "$ROOTFS$INSIDE/model.onnx"
cp "$WORK/x86_64-inputs.npz" "$REPO/deploy/probe_model.py" "$ROOTFS$INSIDE/"
cp -r "$WHEELS" "$ROOTFS$INSIDE/wheels"
ARM_START=$(date +%s)
in_arm64 "
cd $INSIDE
rm -rf /opt/xray-edge
python3 -m venv /opt/xray-edge
/opt/xray-edge/bin/pip install --quiet --no-index --find-links wheels dist/$(basename "$WHEEL") $PINS
/opt/xray-edge/bin/python -c 'import platform, onnxruntime, numpy, cv2; print(platform.machine(), \"python\", platform.python_version(), \"onnxruntime\", onnxruntime.__version__, \"numpy\", numpy.__version__, \"opencv\", cv2.__version__)'
/opt/xray-edge/bin/xray-edge classify images --model model.onnx --threads $THREADS --quiet --output aarch64.csv || [ \$? -eq 1 ]
/opt/xray-edge/bin/python probe_model.py model.onnx --images images --threads $THREADS --save-inputs aarch64-inputs.npz
/opt/xray-edge/bin/python probe_model.py model.onnx --inputs x86_64-inputs.npz --threads $THREADS --output aarch64-model.csv
"
cp "$ROOTFS$INSIDE"/aarch64.csv "$ROOTFS$INSIDE"/aarch64-inputs.npz "$ROOTFS$INSIDE"/aarch64-model.csv "$WORK/"
echo "aarch64 step took $(( $(date +%s) - ARM_START )) s under emulation (install + 2 inference passes; not a speed figure)"

COMPARE=("$HOSTPY" "$REPO/deploy/compare_probs.py")
status=0
log "compare 1/3, preprocessing: model inputs made from the same files (decode, crop, resize, normalise)"
"${COMPARE[@]}" "$WORK/x86_64-inputs.npz" "$WORK/aarch64-inputs.npz" || status=1
log "compare 2/3, model only: probabilities for the very same input tensors"
"${COMPARE[@]}" "$WORK/x86_64-model.csv" "$WORK/aarch64-model.csv" --model "$MODEL" "${TOL[@]}" || status=1
log "compare 3/3, end to end: xray-edge classify on each machine"
"${COMPARE[@]}" "$WORK/x86_64.csv" "$WORK/aarch64.csv" --model "$MODEL" "${TOL[@]}" || status=1
log "$([[ $status -eq 0 ]] && echo "PASS: aarch64 ($BOARD, emulated) agrees with x86-64" || echo "FAIL: see above")"
exit $status
