# Shared shell functions for scripts/demo, scripts/test and scripts/bench-*. Source it; it defines, runs nothing.
# Everything here assumes a Debian 12 machine where we are root (as CI is); PostgreSQL runs as `postgres`.

COPILOT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The PostgreSQL major the scripts drive: 15 here; scripts/test-pg17 runs the SQL suite with 17 in its Debian 13 root.
PG_MAJOR=${COPILOT_PG_MAJOR:-15}
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin
PG_CONFIG=$PG_BIN/pg_config
COPILOT_MODEL_DIR=${COPILOT_MODEL_DIR:-/var/lib/copilot/models}
DEFAULT_MODEL=$COPILOT_MODEL_DIR/qwen2.5-coder-1.5b-copilot-spider-q4_k_m.gguf
TINY_MODEL=$COPILOT_MODEL_DIR/smollm2-135m-instruct-q4_1.gguf
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# carries_adapter FILE: true when a GGUF carries a LoRA adapter beside its weights (`copilot-trainer export
# --beside`; tensor names `….weight.lora_a` in its header), which only our engine applies — llama.cpp refuses such
# a file (it counts the tensors), so the llama.cpp comparisons need plain GGUFs.
carries_adapter() {
  # grep -c reads to the end (-q would stop early, and under pipefail head's SIGPIPE would fail the pipe).
  head -c 64M "$1" | grep -ca 'weight\.lora_a' >/dev/null
}

# apt_install PKG...: install Debian packages on this machine (nothing to do without any).
apt_install() {
  [ $# -gt 0 ] || return 0
  say "installing $*"
  # apt verifies signatures as the unprivileged _apt user, which needs the usual world-writable sticky /tmp.
  [ "$(stat -c %a /tmp)" = 1777 ] || chmod 1777 /tmp
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Install what is missing: PostgreSQL 15 with server headers, clang (bindgen), sudo (cargo pgrx --runas), a font,
# cargo-pgrx 0.18.1, and pgrx's configuration for the system PostgreSQL 15.
ensure_deps() {  # the host's tools, for its PostgreSQL 15 whatever COPILOT_PG_MAJOR says (17 lives in $TRIXIE)
  local pkgs=() pg15=/usr/lib/postgresql/15/bin
  [ -x "$pg15/postgres" ] || pkgs+=(postgresql-15)
  [ -x "$pg15/pg_config" ] || pkgs+=(postgresql-server-dev-15)
  [ -f /usr/include/postgresql/15/server/postgres.h ] || pkgs+=(postgresql-server-dev-15)
  command -v clang >/dev/null || pkgs+=(clang libclang-dev)
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || pkgs+=(libclang-dev)
  command -v sudo >/dev/null || pkgs+=(sudo)
  command -v jq >/dev/null || pkgs+=(jq)
  # eval charts (plotters draws text with this font)
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || pkgs+=(fonts-dejavu-core)
  apt_install "${pkgs[@]}"
  if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.1'; then
    # A debug build: cargo-pgrx only drives cargo, bindgen and the schema generator (each built by cargo as the
    # project's own), so optimising it buys nothing and cost 7.4 min against 3.7 (2-core EPYC, crates cached).
    say "installing cargo-pgrx 0.18.1 (a debug build, about 4 minutes)"
    cargo install cargo-pgrx --version 0.18.1 --locked --quiet --debug
  fi
  if ! grep -q "pg15" "$HOME/.pgrx/config.toml" 2>/dev/null; then
    cargo pgrx init --pg15 "$pg15/pg_config" >/dev/null
  fi
}

# Stop every cluster of ours that has the copilot library loaded: installing over a loaded .so crashes it.
stop_our_clusters() {
  local pidfile dir
  for pidfile in /var/lib/copilot/*/data/postmaster.pid /tmp/copilot-*/data/postmaster.pid; do
    [ -f "$pidfile" ] || continue
    dir=$(dirname "$pidfile")
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir" stop -m fast -w >/dev/null 2>&1 || true
  done
}

# The workspace's version (Cargo.toml), which the extension, the package and the image carry.
COPILOT_VERSION=$(sed -nE 's/^version = "([^"]+)"/\1/p' "$COPILOT_ROOT/Cargo.toml" | head -1)

# build_engine [--release]: build copilot-engine (the process the model runs in); prints the binary's path.
build_engine() {
  local profile=debug flag=()
  [ "${1:-}" = --release ] && { profile=release; flag=(--release); }
  (cd "$COPILOT_ROOT" && cargo build -q "${flag[@]}" -p copilot-core --bin copilot-engine --no-default-features --features model,remote) || return 1
  echo "$COPILOT_ROOT/target/$profile/copilot-engine"
}

# install_engine [--release]: build copilot-engine and put it beside the extension's library, where the worker
# looks for it.
install_engine() {
  local bin
  say "building and installing copilot-engine ${1:-}"
  bin=$(build_engine "$@") || return 1
  install -m 755 "$bin" "$("$PG_CONFIG" --pkglibdir)/copilot-engine"
}

# install_extension [--release]: build and install copilot (and its engine) into the system PostgreSQL 15.
install_extension() {
  stop_our_clusters
  say "building and installing the copilot extension $*"
  (cd "$COPILOT_ROOT/extension" && cargo pgrx install --pg-config "$PG_CONFIG" "$@" 2>&1 | grep -vE '^\s+(Compiling|Checking|Downloaded|Downloading)' >&2)
  # cargo pgrx install copies the upgrade scripts (sql/copilot--A--B.sql) but not the install scripts of earlier
  # versions: without them no database can be created at an earlier version (what tests/sql/loop.sh upgrades).
  local f ext; ext="$("$PG_CONFIG" --sharedir)/extension"
  for f in "$COPILOT_ROOT"/sql/copilot--[0-9]*.sql; do
    case "$(basename "$f")" in *--*--*) ;; *) install -m 644 "$f" "$ext/" ;; esac
  done
  install_engine "$@"
}

# start_cluster DIR PORT MODEL [extra postgresql.conf lines...]: a fresh cluster owned by postgres, with copilot
# preloaded (unless MODEL is "-"), listening on PORT and on a Unix socket in DIR.
start_cluster() {
  local dir=$1 port=$2 model=$3; shift 3
  mkdir -p "$dir"
  chown postgres:postgres "$dir"
  if [ -f "$dir/data/postmaster.pid" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" stop -m fast -w >/dev/null 2>&1 || true
  fi
  rm -rf "$dir/data"
  runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
  {
    echo "port = $port"
    echo "listen_addresses = ''"
    echo "unix_socket_directories = '$dir'"
    if [ "$model" != "-" ]; then
      echo "shared_preload_libraries = 'copilot'"
      echo "copilot.model = '$model'"
    fi
    for line in "$@"; do echo "$line"; done
  } >> "$dir/data/postgresql.conf"
  server_start "$dir"
}

# server_start DIR: start an initialised cluster of ours, with the postgres user's own HOME (hf-hub looks for its
# cache there) and without RUST_BACKTRACE (it would put a Rust backtrace in every ERROR's DETAIL).
server_start() {
  env -u RUST_BACKTRACE HOME="$(getent passwd postgres | cut -d: -f6)" \
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$1/data" -l "$1/server.log" start -w >/dev/null
}

stop_cluster() {
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$1/data" stop -m fast -w >/dev/null 2>&1 || true
}

# pg DIR PORT DB psql-args...: psql as postgres against a cluster of ours.
pg() {
  local dir=$1 port=$2 db=$3; shift 3
  runuser -u postgres -- psql -X -q -h "$dir" -p "$port" -d "$db" "$@"
}

# require_passwords DIR PORT: every role but postgres (on the socket, which the scripts use) logs in with its password
# — what copilot studio's logins need (initdb's `trust` would let anyone name any role).
require_passwords() {
  cat > "$1/data/pg_hba.conf" <<'HBA'
local all postgres trust
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
HBA
  pg "$1" "$2" postgres -qAt -c "SELECT pg_reload_conf()" >/dev/null
}

# analyst_role DIR PORT DB ROLE PASSWORD: an ordinary LOGIN role (made, or its password reset) with what an analyst
# needs: USAGE on copilot's schema (its functions are executable by PUBLIC; copilot.history is readable by PUBLIC
# under row-level security) and on public, and SELECT on public's tables.
analyst_role() {
  pg "$1" "$2" "$3" -v ON_ERROR_STOP=1 -v r="$4" -v p="$5" >/dev/null <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'r') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'r') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'r', :'p') \gexec
SELECT format('GRANT USAGE ON SCHEMA copilot, public TO %I', :'r') \gexec
SELECT format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I', :'r') \gexec
SQL
}

# free_tcp_port FIRST: the first port from FIRST that nobody listens on.
free_tcp_port() {
  local p=$1
  while ss -Hltn "sport = :$p" | grep -q .; do p=$((p + 1)); done
  echo "$p"
}

# wait_ready DIR PORT DB [seconds]: until copilot.status() says ready (or failed, which is printed).
wait_ready() {
  local dir=$1 port=$2 db=$3 limit=${4:-120} state=""
  for _ in $(seq 1 $((limit * 5))); do
    state=$(pg "$dir" "$port" "$db" -At -c "SELECT state FROM copilot.status()" 2>/dev/null || true)
    case "$state" in
      ready) return 0 ;;
      failed) pg "$dir" "$port" "$db" -At -c "SELECT message FROM copilot.status()" >&2; return 1 ;;
    esac
    sleep 0.2
  done
  echo "copilot worker not ready after ${limit}s (state: ${state:-unknown})" >&2
  return 1
}

# The trainer binary, built on demand: release by default; COPILOT_TRAINER_PROFILE=dev (the tests) reuses the
# dependencies `cargo test` already built (they are optimised in dev too, see Cargo.toml).
trainer() {
  local profile=${COPILOT_TRAINER_PROFILE:-release} dir=release flag=(--release)
  [ "$profile" = dev ] && { dir=debug; flag=(); }
  local bin="$COPILOT_ROOT/target/$dir/copilot-trainer"
  if [ ! -x "$bin" ] || [ -n "$(find "$COPILOT_ROOT/trainer/src" "$COPILOT_ROOT/core/src" "$COPILOT_ROOT/core/fastmath/src" -newer "$bin" -name '*.rs' 2>/dev/null | head -1)" ]; then
    (cd "$COPILOT_ROOT" && cargo build -q "${flag[@]}" -p copilot-trainer)
  fi
  "$bin" "$@"
}

# cpu_name: the CPU's model name, then its family/model numbers and the widest vector instructions (AVX2, AVX-512,
# AVX-512 VNNI) — a VM may call a Zen 3 without AVX-512 and a Zen 4 with it both just "AMD EPYC"; the engine's
# `host::cpu_model` says the same. Exported as COPILOT_CPU for the benchmarks' reports.
cpu_name() {
  python3 - <<'PY'
info = {}
for l in open('/proc/cpuinfo'):
    if not l.strip():
        break
    k, _, v = l.partition(':')
    info.setdefault(k.strip(), v.strip())
flags = set(info.get('flags', '').split())
isa = ('AVX-512 VNNI' if 'avx512_vnni' in flags else 'AVX-512') if 'avx512f' in flags else \
      ('AVX2' if 'avx2' in flags else 'no AVX2')
if {'amx_tile', 'amx_int8'} <= flags:
    isa += ', AMX'
cpu = info.get('model name', 'unknown')
print(cpu + (f" (family {info['cpu family']} model {info['model']}; {isa})" if 'cpu family' in info and 'model' in info
             else f" ({isa})"))
PY
}
COPILOT_CPU=${COPILOT_CPU:-$(cpu_name 2>/dev/null || echo unknown)}
export COPILOT_CPU

# machine_json: the machine a benchmark ran on, as a JSON object (CPU, cores, memory, load average now).
machine_json() {
  local bw
  bw=$(read_bandwidth 2>/dev/null || echo null)
  BW=$bw python3 - <<'PY'
import json, os
mem = int(open('/proc/meminfo').readline().split()[1]) / 1048576
bw = os.environ.get("BW", "null")
print(json.dumps({"cpu": os.environ["COPILOT_CPU"], "cores": os.cpu_count(), "memory_gb": round(mem, 1),
                  "read_gb_s": None if bw == "null" else float(bw),
                  "load_avg": open('/proc/loadavg').read().split()[:3]}))
PY
}

# read_bandwidth: memory read bandwidth in GB/s, one thread reading 512 MB (best of 5 passes) — decoding streams
# the weights once per token, so this bounds tokens/s on every CPU. A small C probe, compiled once.
read_bandwidth() {
  local bin=${TMPDIR:-/tmp}/copilot-read-bw
  if [ ! -x "$bin" ]; then
    cc -O2 -x c -o "$bin" - <<'C' || return 1
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
int main(void) {
  size_t n = (512u << 20) / 8; uint64_t *a = malloc(n * 8); if (!a) return 1;
  for (size_t i = 0; i < n; i++) a[i] = i;
  double best = 0; uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int r = 0; r < 5; r++) {
    struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t i = 0; i < n; i += 4) { s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3]; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, gbs = n * 8 / s / 1e9;
    if (gbs > best) best = gbs;
  }
  printf("%.1f\n", best); return (s0 + s1 + s2 + s3) == 42; /* keep the sums */
}
C
  fi
  "$bin"
}

# llama.cpp, built from the sources vendored in the llama-cpp-python sdist, fetched by pip by package name.
LLAMA_PY_VERSION=0.3.36
LLAMA_PY_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_DIR=${COPILOT_LLAMACPP_DIR:-/var/lib/copilot/llama.cpp}
LLAMA_SRC=$LLAMA_DIR/src/vendor/llama.cpp

# ensure_llamacpp TARGET…: build llama.cpp's cmake targets (llama-bench, llama-server) once, by default for the same
# ISA our engine is built for (x86-64-v3: AVX2, FMA, F16C). GGML_NATIVE=ON would follow the CPU's advertised flags, and
# some VMs advertise AVX-512/AMX they do not grant (the binary then dies with SIGILL). COPILOT_LLAMACPP_ISA=avx512
# builds instead for AVX-512 F/CD/BW/DQ/VL with VNNI and VBMI (no AMX, no BF16) into a build of its own — the
# instructions our kernels choose at run time on CPUs that have them, so a benchmark can compare like with like
# there. Binaries: $LLAMA_BIN; what it was built for: $LLAMA_ISA_NOTE.
LLAMA_ISA=${COPILOT_LLAMACPP_ISA:-x86-64-v3}
case "$LLAMA_ISA" in
  x86-64-v3) LLAMA_BUILD=$LLAMA_SRC/build
             LLAMA_ISA_NOTE="x86-64-v3 (AVX2, FMA, F16C; GGML_NATIVE=OFF)"
             LLAMA_ISA_FLAGS=(-DGGML_AVX512=OFF) ;;
  avx512)    LLAMA_BUILD=$LLAMA_SRC/build-avx512
             LLAMA_ISA_NOTE="AVX-512 F/CD/BW/DQ/VL + VNNI + VBMI, with AVX2, FMA, F16C (GGML_NATIVE=OFF; no AMX, no BF16)"
             LLAMA_ISA_FLAGS=(-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=OFF
                              -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX_VNNI=OFF) ;;
  *) echo "COPILOT_LLAMACPP_ISA: x86-64-v3 or avx512, not '$LLAMA_ISA'" >&2; return 1 2>/dev/null || exit 1 ;;
esac
LLAMA_BIN=$LLAMA_BUILD/bin
ensure_llamacpp() {
  local missing=()
  for t in "$@"; do [ -x "$LLAMA_BIN/$t" ] || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v cmake >/dev/null || { say "installing cmake"; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; }
  mkdir -p "$LLAMA_DIR"
  local tarball=$LLAMA_DIR/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz
  if [ ! -f "$tarball" ]; then
    say "fetching the llama-cpp-python $LLAMA_PY_VERSION sdist (llama.cpp's sources) with pip"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$LLAMA_DIR" "llama-cpp-python==$LLAMA_PY_VERSION"
  fi
  echo "$LLAMA_PY_SHA256  $tarball" | sha256sum -c --quiet
  if [ ! -f "$LLAMA_SRC/CMakeLists.txt" ]; then
    rm -rf "$LLAMA_DIR/src" && mkdir -p "$LLAMA_DIR/src"
    tar xzf "$tarball" -C "$LLAMA_DIR/src" --strip-components=1
  fi
  say "building llama.cpp ${missing[*]} for $LLAMA_ISA_NOTE (a few minutes)"
  (cd "$LLAMA_SRC" &&
    cmake -B "$LLAMA_BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON "${LLAMA_ISA_FLAGS[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null &&
    cmake --build "$LLAMA_BUILD" -j"$(nproc)" --target "${missing[@]}" >/dev/null)
}
# Mounts into a chroot (debootstrapped roots), undone newest first by root_unmount (callers trap it on EXIT).
ROOT_MOUNTS=()
root_bind() {  # root_bind ROOT HOST_PATH PATH_IN_ROOT [mount options, e.g. -o ro]
  local src=$2 dst=$1$3; shift 3
  mkdir -p "$dst"
  mountpoint -q "$dst" || { mount --bind "$@" "$src" "$dst"; ROOT_MOUNTS=("$dst" "${ROOT_MOUNTS[@]}"); }
}
root_proc() {  # root_proc ROOT
  mountpoint -q "$1/proc" || { mount -t proc proc "$1/proc"; ROOT_MOUNTS=("$1/proc" "${ROOT_MOUNTS[@]}"); }
}
root_unmount() {
  local m
  for m in "${ROOT_MOUNTS[@]}"; do umount "$m" 2>/dev/null || true; done
  ROOT_MOUNTS=()
}
# The Debian 13 (trixie) root where Debian's PostgreSQL 17 lives (the host, Debian 12, must not mix suites):
# made by `scripts/test-pg17 --root`, used by test-pg17 and `COPILOT_PG_MAJOR=17 scripts/package`.
TRIXIE=/var/lib/copilot/images/rootfs-trixie
# What a build or test inside it needs from the host: /proc, /dev, the Rust toolchain, this checkout (at its own
# path) and the models.
trixie_mount_build() {
  root_proc "$TRIXIE"
  root_bind "$TRIXIE" /dev /dev
  root_bind "$TRIXIE" "$HOME/.rustup" /root/.rustup
  root_bind "$TRIXIE" "$HOME/.cargo" /root/.cargo
  root_bind "$TRIXIE" "$COPILOT_ROOT" "$COPILOT_ROOT"
  root_bind "$TRIXIE" "$COPILOT_MODEL_DIR" /var/lib/copilot/models
}
