#!/usr/bin/env bash
# Builds the runtime stage of deploy/Dockerfile around an already-built `prompter` binary and
# checks the image: it starts, runs as uid 10001, plays the demo, ingests the knowledge base into
# the volume, becomes healthy on the live config with a read-only root, and stops cleanly on
# SIGTERM. Not part of CI (it needs a Docker daemon); run it by hand from anywhere:
#
#   bash deploy/check-image.sh                    # binary: target/release/prompter
#   PROMPTER_BIN=/path/to/prompter IMAGE=prompter:check bash deploy/check-image.sh
#
# What is and is not covered:
# - The Dockerfile's rust build stage is replaced by a stage that copies the prebuilt binary to
#   /usr/local/bin/prompter. Everything from `FROM debian:bookworm-slim` on is taken verbatim from
#   deploy/Dockerfile at each run, so the check follows the file. Build the binary on Debian 12
#   (glibc 2.36) or older, or it will not start in the image.
# - The base is the local `debian:bookworm-slim`: pulled if Docker Hub is reachable, otherwise
#   (as root, with debootstrap installed) a `debootstrap --variant=minbase bookworm` root, slimmed
#   the way the official -slim images are and imported under that tag.
# - `prompter run` on the shipped prompter-live.yaml needs Symbl (a token at start) and Nebula
#   (embeddings for `kb ingest`). With python3 on the host, a small fake of those two endpoints
#   runs on the Docker bridge's host address and the env file points SYMBL_API_BASE and
#   NEBULA_BASE_URL at it; without python3, the health and stop checks use
#   `demo --console --listen 0.0.0.0:7070` instead (which stops on SIGINT, not SIGTERM).
#
# Prints PASS/FAIL/INFO lines; exits 1 if any check failed, 0 with "SKIP: ..." when there is no
# Docker daemon. The built image is left in place (`docker rmi "$IMAGE"` removes it);
# containers, the volume and temporary files are removed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${PROMPTER_BIN:-$ROOT/target/release/prompter}
IMAGE=${IMAGE:-prompter:check}
BASE=debian:bookworm-slim
NAME=prompter-check-$$
VOLUME=prompter-check-state-$$
HEALTH_WAIT=${HEALTH_WAIT:-90}   # seconds to wait for "healthy"
STOP_TIMEOUT=60                  # as the README's `docker run --stop-timeout 60`

skip() { echo "SKIP: $*"; exit 0; }
command -v docker >/dev/null 2>&1 || skip "docker is not installed"
docker info >/dev/null 2>&1 || skip "no Docker daemon is running (docker info failed)"

failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
info() { echo "INFO: $*"; }
die() { echo "FAIL: $*"; exit 1; }

[ -x "$BIN" ] || die "no binary at $BIN: cargo build --release --locked -p prompter-cli, or set PROMPTER_BIN"

TMP=$(mktemp -d)
FAKE_PID=
cleanup() {
  docker rm -f -v "$NAME" >/dev/null 2>&1 || true
  docker volume rm "$VOLUME" >/dev/null 2>&1 || true
  [ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

# ---- the base image ---------------------------------------------------------------------------
make_base() {
  local rootfs=$TMP/rootfs
  echo "building $BASE locally: debootstrap --variant=minbase bookworm (about a minute)" >&2
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$TMP/debootstrap.log" 2>&1 \
    || { tail -n 20 "$TMP/debootstrap.log"; die "debootstrap failed"; }
  # As the official -slim images (debuerreotype --slimify): no docs, man pages or translations,
  # apt caches cleaned, and the same apt sources (bookworm, bookworm-updates, bookworm-security).
  rm -f "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/lib/apt/lists/*
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{groff,info,linda,lintian/overrides,locale,man}/*
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  tar -C "$rootfs" --numeric-owner -c . \
    | docker import --change 'CMD ["bash"]' \
        --change 'LABEL prompter.check-image.base="debootstrap --variant=minbase bookworm"' - "$BASE" >/dev/null
  rm -rf "$rootfs"
}

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if timeout 120 docker pull -q "$BASE" >/dev/null 2>&1; then
    :
  elif command -v debootstrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    make_base
  else
    die "no $BASE image, it cannot be pulled, and debootstrap (as root) is not available to make one"
  fi
fi
base_origin=$(docker image inspect -f '{{index .Config.Labels "prompter.check-image.base"}}' "$BASE" 2>/dev/null || true)
[ -n "$base_origin" ] || base_origin="from a registry: $(docker image inspect -f '{{join .RepoDigests " "}}' "$BASE")"
base_size=$(docker image inspect -f '{{.Size}}' "$BASE")
info "base $BASE $(docker image inspect -f '{{.Id}}' "$BASE" | cut -c8-19), $base_size bytes ($base_origin)"

# ---- the Dockerfile and the build context ----------------------------------------------------
# Everything from the runtime stage's FROM line on, verbatim (the `# syntax=` line, the ARG and
# the rust build stage are before it).
awk 'p || /^FROM debian:bookworm-slim([[:space:]]|$)/ { p = 1; print }' "$ROOT/deploy/Dockerfile" >"$TMP/runtime.part"
[ -s "$TMP/runtime.part" ] || die "deploy/Dockerfile has no line starting with 'FROM debian:bookworm-slim'"
[ "$(grep -c '^FROM ' "$TMP/runtime.part")" = 1 ] || die "deploy/Dockerfile has stages after the runtime stage"
{
  echo "# Generated by deploy/check-image.sh: a prebuilt binary instead of the rust build stage,"
  echo "# then the runtime stage of deploy/Dockerfile verbatim."
  echo "FROM debian:bookworm-slim AS build"
  echo "COPY prompter-bin /usr/local/bin/prompter"
  echo "LABEL prompter.check-image.stage=build"
  echo
  cat "$TMP/runtime.part"
} >"$TMP/Dockerfile"

# The real context is the checkout filtered by ../.dockerignore, which leaves out target/; this
# one holds what the runtime stage COPYs, filtered by the same .dockerignore, plus the binary.
mkdir "$TMP/context"
cp "$ROOT/prompter-live.yaml" "$TMP/context/"
cp -a "$ROOT/pipelines" "$TMP/context/"
install -m 0755 "$BIN" "$TMP/context/prompter-bin"
{ cat "$ROOT/.dockerignore"; echo '!prompter-bin'; } >"$TMP/context/.dockerignore"

# The classic builder: it ignores `# syntax=` frontends and uses local base images, so it works
# offline (BuildKit would try to resolve them on Docker Hub).
if ! DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" -f "$TMP/Dockerfile" "$TMP/context" >"$TMP/build.log" 2>&1; then
  # With networks where the default bridge cannot reach the apt mirror, the host network may.
  if DOCKER_BUILDKIT=0 docker build -q --network host -t "$IMAGE" -f "$TMP/Dockerfile" "$TMP/context" >"$TMP/build.log" 2>&1; then
    info "the build needed --network host (apt could not reach the mirror from the default bridge)"
  else
    tail -n 30 "$TMP/build.log"
    die "docker build of the runtime stage failed"
  fi
fi
# The classic builder leaves the build stage as an untagged image: remove it.
docker image prune -f --filter label=prompter.check-image.stage=build >/dev/null
pass "runtime stage of deploy/Dockerfile built on $BASE: $IMAGE $(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c8-19)"

# ---- static checks ----------------------------------------------------------------------------
if out=$(docker run --rm "$IMAGE" --version 2>&1) && [[ $out == prompter\ * ]]; then
  pass "docker run --rm $IMAGE --version: $out"
else
  fail "docker run --rm $IMAGE --version: $out"
fi

out=$(docker run --rm --entrypoint id "$IMAGE" 2>&1 || true)
if [[ $out == uid=10001\(prompter\)\ gid=10001\(prompter\)* ]]; then
  pass "docker run --rm --entrypoint id $IMAGE: $out"
else
  fail "docker run --rm --entrypoint id $IMAGE: $out (want uid=10001 gid=10001)"
fi

if docker run --rm --entrypoint test "$IMAGE" -s /etc/ssl/certs/ca-certificates.crt; then
  pass "ca-certificates installed (/etc/ssl/certs/ca-certificates.crt)"
else
  fail "no /etc/ssl/certs/ca-certificates.crt in the image"
fi

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
info "image size $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f MB", s / 1e6 }')); $((size - base_size)) bytes above the base"

if docker run --rm "$IMAGE" demo --speed 50 --no-color >"$TMP/demo.out" 2>&1; then
  cards=$(grep -c '+-- SUGGESTION |' "$TMP/demo.out" || true)
  if [ "$cards" -ge 1 ]; then
    pass "docker run --rm $IMAGE demo --speed 50 --no-color: exit 0, $cards suggestion card(s), $(wc -l <"$TMP/demo.out") lines"
  else
    fail "demo exited 0 but printed no suggestion card"; tail -n 20 "$TMP/demo.out"
  fi
else
  fail "demo exited non-zero"; tail -n 20 "$TMP/demo.out"
fi

# ---- the server: volume, read-only root, health, stop -----------------------------------------
docker volume create "$VOLUME" >/dev/null
run_flags=(--read-only --tmpfs /tmp -v "$VOLUME:/var/lib/prompter" --stop-timeout "$STOP_TIMEOUT"
           --health-interval 2s --health-start-period 1s -p 127.0.0.1::7070)
if command -v python3 >/dev/null 2>&1; then
  mode=live
  # The host's address on the default bridge, as containers see it.
  host_ip=$(docker run --rm --add-host prompter-fakes:host-gateway --entrypoint getent "$IMAGE" hosts prompter-fakes | awk '{ print $1 }')
  cat >"$TMP/fake.py" <<'EOF'
# Fake Symbl token endpoint and Nebula embeddings, enough for `prompter kb ingest` and `run`.
import hashlib, json, math, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/oauth2/token:generate":
            return self.reply({"accessToken": "fake-token", "expiresIn": 86400})
        if self.path != "/v1/model/embed":
            return self.send_error(404)
        seed = hashlib.sha256(str(body.get("text", "")).encode()).digest()
        v = [((seed[i % 32] ^ (i * 37)) % 251) / 251.0 - 0.5 for i in range(1024)]
        n = math.sqrt(sum(x * x for x in v)) or 1.0
        self.reply({"model": body.get("model"), "embedding": [x / n for x in v]})
    def reply(self, obj):
        out = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
server = ThreadingHTTPServer((sys.argv[1], 0), H)
with open(sys.argv[2], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
EOF
  python3 "$TMP/fake.py" "$host_ip" "$TMP/fake.port" >"$TMP/fake.log" 2>&1 &
  FAKE_PID=$!
  for _ in $(seq 50); do [ -s "$TMP/fake.port" ] && break; sleep 0.1; done
  [ -s "$TMP/fake.port" ] || { cat "$TMP/fake.log"; die "the fake Symbl/Nebula did not start on $host_ip"; }
  fake=http://prompter-fakes:$(cat "$TMP/fake.port")
  # What prompter-live.yaml needs (deploy/prompter.env.example's required block), fake values.
  cat >"$TMP/prompter.env" <<EOF
SYMBL_APP_ID=check-image
SYMBL_APP_SECRET=check-image
NEBULA_API_KEY=check-image
PROMPTER_FEED_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
SYMBL_API_BASE=$fake
NEBULA_BASE_URL=$fake
EOF
  run_flags+=(--env-file "$TMP/prompter.env" --add-host prompter-fakes:host-gateway)
  info "fake Symbl token + Nebula embeddings on $host_ip:$(cat "$TMP/fake.port") (SYMBL_API_BASE, NEBULA_BASE_URL)"

  if out=$(docker run --rm --read-only --tmpfs /tmp -v "$VOLUME:/var/lib/prompter" --env-file "$TMP/prompter.env" \
             --add-host prompter-fakes:host-gateway "$IMAGE" kb ingest /etc/prompter/pipelines/data/sales_objections.csv \
             --store sales --config /etc/prompter/prompter-live.yaml 2>&1); then
    pass "kb ingest into the volume (--read-only): $(tail -n 1 <<<"$out")"
  else
    fail "kb ingest into the volume: $out"
  fi
  docker run -d --name "$NAME" "${run_flags[@]}" "$IMAGE" >/dev/null
  what="the default command (run --config /etc/prompter/prompter-live.yaml)"
else
  mode=demo-console
  info "no python3 for the fake Symbl/Nebula: health and stop checks use demo --console instead of the live config"
  docker run -d --name "$NAME" "${run_flags[@]}" "$IMAGE" demo --console --listen 0.0.0.0:7070 --no-color >/dev/null
  what="demo --console --listen 0.0.0.0:7070"
fi

status=starting
for _ in $(seq "$HEALTH_WAIT"); do
  status=$(docker inspect -f '{{if .State.Running}}{{.State.Health.Status}}{{else}}exited{{end}}' "$NAME")
  [ "$status" = starting ] || break
  sleep 1
done
if [ "$status" = healthy ]; then
  pass "$what, --read-only, volume: health status healthy ($(docker inspect -f '{{len .State.Health.Log}}' "$NAME") probe(s))"
else
  fail "$what: health status $status after ${HEALTH_WAIT}s"
  docker logs "$NAME" 2>&1 | tail -n 20
fi

# /health through the published port, from the host.
port=$(docker port "$NAME" 7070/tcp 2>/dev/null | head -n 1 | sed 's/.*://')
if [ -n "$port" ] && command -v curl >/dev/null 2>&1; then
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
  if [ "$code" = 200 ]; then pass "GET /health on the published port 127.0.0.1:$port: $code"; else fail "GET /health on the published port: $code"; fi
fi

if [ "$mode" = live ] && [ "$status" = healthy ]; then
  if docker exec "$NAME" touch /etc/prompter/x 2>/dev/null || docker exec "$NAME" touch /usr/local/x 2>/dev/null; then
    fail "the root filesystem is writable despite --read-only"
  else
    pass "root filesystem read-only; the volume holds: $(docker exec "$NAME" find /var/lib/prompter -type f -printf '%p(uid %U) ')"
  fi
fi

start=$(date +%s.%N)
if [ "$mode" = live ]; then
  stop_how="docker stop (SIGTERM)"
  docker stop -t "$STOP_TIMEOUT" "$NAME" >/dev/null
else
  # `demo --console` waits for Ctrl-C only: as PID 1 it ignores SIGTERM, and `docker stop` would
  # end it with SIGKILL after the timeout. SIGTERM handling is `run`'s, checked in live mode.
  info "demo --console stops on SIGINT only; docker stop's SIGTERM is not checked in this mode"
  stop_how="docker kill -s INT"
  docker kill -s INT "$NAME" >/dev/null
  timeout "$STOP_TIMEOUT" docker wait "$NAME" >/dev/null || docker kill "$NAME" >/dev/null 2>&1 || true
fi
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
last=$(docker logs "$NAME" 2>&1 | tail -n 1)
if [ "$code" = 0 ] && awk -v e="$elapsed" -v t="$STOP_TIMEOUT" 'BEGIN { exit !(e < t) }'; then
  pass "$stop_how: exit code 0 after ${elapsed}s (stop timeout ${STOP_TIMEOUT}s); last log line: $last"
else
  fail "$stop_how: exit code $code after ${elapsed}s (stop timeout ${STOP_TIMEOUT}s); last log line: $last"
fi

if [ "$failures" -gt 0 ]; then
  echo "$failures check(s) failed; image $IMAGE left for inspection"
  exit 1
fi
echo "all checks passed; image $IMAGE (docker rmi $IMAGE to remove it)"
