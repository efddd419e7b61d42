#!/usr/bin/env bash
# `make run`: start a registry and a hub on loopback, push the demo image,
# sign and publish a manifest, boot the node in QEMU (user networking with a
# host forward to the published port), and print the URL. Ctrl-C stops
# everything; every process started here is stopped by its pid on exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/out"
tools="${CARGO_TARGET_DIR:?}/debug"
run=$(mktemp -d -t cairn-run.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
reg_port=$(free_port); web_port=$(free_port)

# 1. A real registry (Debian's docker-registry), on loopback only.
cat > "$run/registry.yml" <<YML
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $run/registry } }
http: { addr: 127.0.0.1:$reg_port }
YML
docker-registry serve "$run/registry.yml" > "$run/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$reg_port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

# 2. Push the demo image built from demo/hello.
digest=$("$tools/cairn-image" push --layout "$out/hello-oci" --to "127.0.0.1:$reg_port/demo/hello:latest" --insecure | tail -1 | sed 's/.*@//')
echo "==> pushed demo/hello@$digest"

# 3. The hub, on loopback (its admin API is unauthenticated: never expose it).
"$tools/cairn-hub" --data "$run/hub" --listen 127.0.0.1:0 --port-file "$run/hub.port" > "$run/hub.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -s "$run/hub.port" ] && break; sleep 0.1; done
hub_port=$(cat "$run/hub.port")
hub="http://127.0.0.1:$hub_port"

# 4. Sign and publish the demo manifest. The node reaches the host as 10.0.2.2.
cat > "$run/demo.toml" <<TOML
node = "demo"
version = 1

[[container]]
name = "hello"
image = { registry = "10.0.2.2:$reg_port", repository = "demo/hello", digest = "$digest", insecure = true }
port = [{ host = 8080, container = 80 }]
restart = "always"
TOML
"$tools/cairnctl" sign --key "$out/keys/demo.key" --ttl 24h -o "$run/demo.bin" "$run/demo.toml"
"$tools/cairnctl" publish --hub "$hub" demo "$run/demo.bin"

# 5. Tell the user where to look once the container answers.
(
  for _ in $(seq 600); do
    if body=$(curl -fsS --max-time 2 "http://127.0.0.1:$web_port/" 2>/dev/null); then
      printf '\n==> the demo container answers: curl http://127.0.0.1:%s/\n==> %s\n==> node status: %s nodes --hub %s   (Ctrl-C stops everything)\n\n' \
        "$web_port" "$body" "$tools/cairnctl" "$hub" >&2
      "$tools/cairnctl" nodes --hub "$hub" >&2 || true
      exit 0
    fi
    sleep 0.5
  done
) &
pids+=($!)

# 6. Boot the node. No public DNS/NTP is configured: QEMU's user network
#    only forwards to the host, and the manifest names the registry by IP.
echo "==> booting the node (QEMU, TCG); serial console follows"
qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 2 -no-reboot \
  -display none -chardev stdio,id=con,signal=on -serial chardev:con \
  -kernel "$out/bzImage" -initrd "$out/initramfs.cpio.zst" \
  -append "console=ttyS0 panic=-1 cairn.hub=http://10.0.2.2:$hub_port cairn.node=demo cairn.poll=2" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$web_port-:8080" -device virtio-net-pci,netdev=n0 &
pids+=($!)
wait "${pids[-1]}"
