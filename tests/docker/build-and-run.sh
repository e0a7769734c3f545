#!/bin/bash
# Build the project's Docker image from its Dockerfile, unchanged, on a CPU stand-in for its
# PyTorch base image, and run it as a user would; tests/docker/test_image.py checks what came out.
# .ci/run starts this as root. Needs root when no Docker engine answers: it then installs Debian's
# docker.io (and mmdebstrap for the stand-in) and starts dockerd, and stops that dockerd at exit.
#
#   bash tests/docker/build-and-run.sh
#
# Phases, each timed, its exit code and seconds appended to OUT/phases.tsv, its output in
# OUT/logs/PHASE.log:
#   apt        install docker.io / mmdebstrap where missing
#   engine     start dockerd where no engine answers
#   rootfs     Debian bookworm with python3 (mmdebstrap | docker import)         } only when the
#   wheel      torch==<the Dockerfile's base torch>, CPU, cp311 (pip download)     } stand-in base
#   base       tests/docker/torch-cpu-base.Dockerfile on them                     } is not built yet
#   build      docker build --build-arg BASE_IMAGE=<stand-in> (the project's Dockerfile)
#   files      the files of the image's working directory (OUT/image-files.txt)
#   train      the image's own CMD plus a few overrides that shorten it (OUT/runs/smoke)
#   eval       competesmoe-eval on that run's checkpoint (OUT/runs/smoke/eval.json)
#   torchrun   competesmoe-launch torchrun with 2 CPU processes (OUT/runs/torchrun)
# The runs have no network (--network none; torchrun the default one) and write to OUT/runs and
# OUT/data_cache through bind mounts at /workspace/runs and /workspace/data_cache, the paths of the
# Dockerfile's CMD.
#
# Exit codes: 0 every phase passed; 1 a phase of the project's image failed (the test fails and
# says which); 3 no engine or no stand-in base could be set up here: OUT/unavailable.txt says why
# and the test skips with that reason.
#
#   COMPETESMOE_DOCKER_OUT     results (default runs/docker in this checkout; emptied first)
#   COMPETESMOE_DOCKER_STATE   dockerd's log, the stand-in's build context (default /var/tmp/competesmoe-docker)
#   COMPETESMOE_DOCKERFILE     the Dockerfile to build (default Dockerfile; e.g. a broken copy, to
#                              see the test fail)
#   COMPETESMOE_TORCH_WHEEL    a torch CPU wheel for cp311 to use instead of pip download
#   COMPETESMOE_DEBIAN_MIRROR  mirror for the stand-in's root file system (default: the host's
#                              Debian mirror, else http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/../.."

out=$(realpath -m "${COMPETESMOE_DOCKER_OUT:-runs/docker}")
state=${COMPETESMOE_DOCKER_STATE:-/var/tmp/competesmoe-docker}
dockerfile=${COMPETESMOE_DOCKERFILE:-Dockerfile}
image=competesmoe-ci/competesmoe:test
suite=bookworm          # its python3 is 3.11: the wheel below must be cp311
python_version=3.11
packages=python3,python3-venv,ca-certificates
run_timeout=600

rm -rf "$out"
mkdir -p "$out/logs" "$out/runs" "$out/data_cache" "$state"
printf 'phase\trc\tseconds\n' > "$out/phases.tsv"
# What was built: git's tree of this checkout's files (tracked, or new and not ignored: the build
# context), through an index of its own. The test skips the results of another tree.
index=$(mktemp -d)
if GIT_INDEX_FILE=$index/index git add -A 2>/dev/null; then
  GIT_INDEX_FILE=$index/index git write-tree > "$out/tree.txt"
fi
rm -rf "$index"

phase() {  # phase NAME COMMAND...: run COMMAND with its output in logs/NAME.log, record rc and time
  local name=$1 start rc=0
  shift
  echo "== $name: $*" >&2
  start=$EPOCHREALTIME
  "$@" > "$out/logs/$name.log" 2>&1 || rc=$?
  awk -v n="$name" -v rc="$rc" -v s="$start" -v e="$EPOCHREALTIME" 'BEGIN { printf "%s\t%s\t%.1f\n", n, rc, e - s }' \
    >> "$out/phases.tsv"
  if [ "$rc" -ne 0 ]; then
    echo "== $name failed with exit code $rc; the end of $out/logs/$name.log:" >&2
    tail -n 20 "$out/logs/$name.log" >&2
  fi
  return "$rc"
}

unavailable() {  # unavailable REASON: nothing to test here; the test skips with REASON
  echo "$1" > "$out/unavailable.txt"
  echo "docker: $1 (the docker test will be skipped)" >&2
  exit 3
}

engine_up() { docker info >/dev/null 2>&1; }

apt_install() {
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

dockerd_pid=
stop_engine() {  # only the dockerd this script started, by its pid
  [ -n "$dockerd_pid" ] || return 0
  kill "$dockerd_pid" 2>/dev/null || return 0
  for _ in $(seq 1 60); do
    kill -0 "$dockerd_pid" 2>/dev/null || return 0
    sleep 0.5
  done
}

start_engine() {
  dockerd < /dev/null > "$state/dockerd.log" 2>&1 &
  dockerd_pid=$!
  trap stop_engine EXIT
  for _ in $(seq 1 120); do
    engine_up && return 0
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.5
  done
  tail -n 20 "$state/dockerd.log"
  return 1
}

# -- the engine ------------------------------------------------------------------------------------
if ! engine_up; then
  [ "$(id -u)" -eq 0 ] || unavailable "no Docker engine answers and starting one needs root (as root: bash $0)"
  missing=()
  command -v dockerd >/dev/null && command -v docker >/dev/null || missing+=(docker.io)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)  # a new engine has no stand-in base yet
  if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || unavailable "no Docker engine, and no apt-get to install Debian's docker.io"
    phase apt apt_install "${missing[@]}" || unavailable "apt-get could not install ${missing[*]} (see $out/logs/apt.log)"
  fi
  phase engine start_engine || unavailable "dockerd did not start (see $out/logs/engine.log and $state/dockerd.log)"
fi

# -- the stand-in base image -----------------------------------------------------------------------
# It plays pytorch/pytorch:<torch>-...: the torch of the Dockerfile's default base image.
torch_version=$(sed -n 's|^ARG BASE_IMAGE=pytorch/pytorch:\([0-9][0-9.]*\)-.*|\1|p' "$dockerfile")
if [ -z "$torch_version" ]; then
  echo "error: $dockerfile has no 'ARG BASE_IMAGE=pytorch/pytorch:<torch>-...' line to take the torch version from" \
    | tee "$out/logs/build.log" >&2
  printf 'build\t2\t0\n' >> "$out/phases.tsv"
  exit 1
fi
key=$(cat tests/docker/torch-cpu-base.Dockerfile <(echo "$suite $packages $torch_version") | sha256sum | cut -c1-12)
base=competesmoe-ci/torch-cpu-base:$torch_version-$key

rootfs() {
  local mirror=${COMPETESMOE_DEBIAN_MIRROR:-}
  if [ -z "$mirror" ] && grep -qx 'ID=debian' /etc/os-release 2>/dev/null; then
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  fi
  # mmdebstrap, not debootstrap: it downloads in parallel through apt (about 40 s instead of 3 min
  # here); force-unsafe-io spares dpkg's fsyncs, also in the image's own apt-get later.
  mmdebstrap --variant=minbase --include="$packages" --dpkgopt=force-unsafe-io \
    "$suite" - "${mirror:-http://deb.debian.org/debian}" | docker import - "competesmoe-ci/$suite-rootfs:$key"
}

wheel() {
  local ctx=$state/base-context
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
  if [ -n "${COMPETESMOE_TORCH_WHEEL:-}" ]; then
    cp "$COMPETESMOE_TORCH_WHEEL" "$ctx/"
  else
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$python_version" \
      --platform "manylinux_2_28_$(uname -m)" -d "$ctx" "torch==$torch_version"
  fi
  ls "$ctx"/torch-*+cpu-*.whl >/dev/null 2>&1 || {
    echo "error: no CPU build of torch==$torch_version for Python $python_version in $ctx ($(ls "$ctx")):" \
         "set COMPETESMOE_TORCH_WHEEL to one (torch-$torch_version+cpu-cp311-...whl)"
    return 1
  }
}

if docker image inspect "$base" >/dev/null 2>&1; then
  echo "== base: $base is already built" >&2
else
  if ! command -v mmdebstrap >/dev/null; then
    phase apt apt_install mmdebstrap || unavailable "apt-get could not install mmdebstrap (see $out/logs/apt.log)"
  fi
  phase rootfs rootfs || unavailable "could not make a Debian $suite root file system (see $out/logs/rootfs.log)"
  phase wheel wheel || unavailable "no CPU torch==$torch_version wheel for the stand-in base (see $out/logs/wheel.log)"
  phase base docker build --build-arg "ROOTFS=competesmoe-ci/$suite-rootfs:$key" \
    -f tests/docker/torch-cpu-base.Dockerfile -t "$base" "$state/base-context" \
    || unavailable "the stand-in base image did not build (see $out/logs/base.log)"
  rm -rf "$state/base-context"  # the wheel is in the image now
fi

# -- the project's image and its runs --------------------------------------------------------------
printf 'dockerfile\t%s\nbase\t%s\nimage\t%s\n' "$dockerfile" "$base" "$image" > "$out/image.txt"
phase build docker build --build-arg "BASE_IMAGE=$base" -f "$dockerfile" -t "$image" . || exit 1
docker image inspect -f 'size	{{.Size}}' "$image" >> "$out/image.txt"

in_image() {  # [NETWORK=...] in_image NAME ARGS...: docker run the image, results in OUT
  local name=competesmoe-ci-$1 rc=0
  shift
  docker rm -f "$name" >/dev/null 2>&1 || true
  # OMP_NUM_THREADS passes on where it is set (on a shared machine, 2 threads each are far slower)
  timeout "$run_timeout" docker run --rm --name "$name" --network "${NETWORK:-none}" --ipc=host \
    ${OMP_NUM_THREADS:+-e OMP_NUM_THREADS="$OMP_NUM_THREADS"} \
    -v "$out/runs:/workspace/runs" -v "$out/data_cache:/workspace/data_cache" "$image" "$@" || rc=$?
  [ "$rc" -ne 124 ] || { echo "timed out after $run_timeout s" >&2; docker rm -f "$name" >/dev/null 2>&1 || true; }
  return "$rc"
}

list_files() { in_image files find . -type f > "$out/image-files.txt"; }

status=0
phase files list_files || status=1

# The image's own command, as `docker run IMAGE` runs it, shortened by overrides appended to it.
mapfile -t cmd < <(docker image inspect -f '{{range .Config.Cmd}}{{println .}}{{end}}' "$image" | sed '/^$/d')
printf '%s\n' "${cmd[@]}" > "$out/cmd.txt"
phase train in_image train "${cmd[@]}" train.steps=40 train.log_every=10 train.eval_every=20 train.eval_batches=4 \
  || status=1
phase eval in_image eval competesmoe-eval /workspace/runs/smoke --limit 20 --out /workspace/runs/smoke/eval.json \
  || status=1
# On the default network: torchrun's rendezvous gives the workers the container's host name, which
# only resolves there (with --network none they wait for it until they time out).
NETWORK=bridge phase torchrun in_image torchrun competesmoe-launch torchrun configs/smoke.yaml --procs-per-node 2 \
  run.dir=/workspace/runs/torchrun data.cache_dir=/workspace/data_cache \
  train.steps=20 train.log_every=5 train.eval_every=20 train.eval_batches=2 || status=1

echo "== phases (seconds):" >&2
column -t "$out/phases.tsv" >&2 || cat "$out/phases.tsv" >&2
exit "$status"
