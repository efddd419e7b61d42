# cairn — the front door. `make run` boots the demo node; `make test` runs
# the whole suite. Build outputs go to out/ (ignored by git); the cargo
# target dir and the kernel live outside the clone so CI and fresh clones
# reuse them.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/cairn
export CARGO_TARGET_DIR ?= $(CACHE)/target
export CAIRN_CACHE := $(CACHE)
MUSL := x86_64-unknown-linux-musl
OUT := $(CURDIR)/out
INIT_BIN := $(CARGO_TARGET_DIR)/$(MUSL)/release/cairn-init
HELLO_BIN := $(CARGO_TARGET_DIR)/$(MUSL)/release/hello
TOOLS := $(CARGO_TARGET_DIR)/debug
export SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 1700000000)

APT_PACKAGES := linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev \
	qemu-system-x86 qemu-utils dnsmasq-base docker-registry musl-tools cpio busybox-static \
	xz-utils zstd iproute2 nftables chrony python3 curl ca-certificates e2fsprogs fdisk \
	ipxe xorriso isolinux syslinux-common systemd-boot-efi ovmf mtools dosfstools kmod

.PHONY: all deps kernel debian-kernel init tools image demo-image media run test unit e2e lint bench clean

all: image demo-image

deps:
	@# Two passes: apt may remove an installed package to resolve a conflict
	@# (a backported qemu-utils gave way to Debian's qemu-system-x86 once).
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	for pass in 1 2; do \
	missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing" $$missing; \
	  { [ $$pass = 2 ] || $$SUDO apt-get update -qq; } && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
	else echo "deps: all Debian packages present"; break; fi; \
	done
	@rustup target list --installed | grep -qx $(MUSL) || rustup target add $(MUSL)

kernel:
	@mkdir -p $(OUT)
	@k=$$(kernel-config/build.sh) && cp "$$k" $(OUT)/bzImage && cp "$$(dirname $$k)/config" $(OUT)/kernel.config
	@echo "kernel: $(OUT)/bzImage ($$(stat -c %s $(OUT)/bzImage) bytes)"

# Debian's modular kernel, unpacked and depmod'ed outside the clone (the
# variant that proves the same PID 1 drives a distribution kernel).
debian-kernel:
	@kernel-config/debian-kernel.sh

init:
	cargo build --release --target $(MUSL) -p cairn-init -p cairn-demo-hello

tools:
	cargo build -p cairn-hub -p cairn-image

# The demo signing key lives in out/keys (never committed); make one if missing.
$(OUT)/keys/demo.key: | tools
	@mkdir -p $(OUT)/keys
	$(TOOLS)/cairnctl keygen --out $(OUT)/keys --name demo

image: kernel init tools $(OUT)/keys/demo.key
	$(TOOLS)/cairn-image initramfs --init $(INIT_BIN) --keys $(OUT)/keys --out $(OUT)/initramfs.cpio.zst

demo-image: init tools
	$(TOOLS)/cairn-image oci --binary $(HELLO_BIN) --name hello --port 80 --out $(OUT)/hello-oci

# Every boot medium, reproducible (SOURCE_DATE_EPOCH), with out/SHA256SUMS
# and out/SIZES. HUB_URL is built into the netboot ISO, the loader and the
# full ISO's command line; the cloud image takes its hub from a config drive.
HUB_URL ?= http://10.0.2.2:7400
MEDIA_CMDLINE ?= console=ttyS0 console=tty0 panic=10
media: image
	$(TOOLS)/cairn-image netboot-iso --hub $(HUB_URL) --out $(OUT)/cairn-netboot.iso
	$(TOOLS)/cairn-image iso --kernel $(OUT)/bzImage --initramfs $(OUT)/initramfs.cpio.zst \
	  --cmdline "$(MEDIA_CMDLINE) cairn.mode=loader cairn.hub=$(HUB_URL)" --out $(OUT)/cairn-loader.iso
	$(TOOLS)/cairn-image iso --kernel $(OUT)/bzImage --initramfs $(OUT)/initramfs.cpio.zst \
	  --cmdline "$(MEDIA_CMDLINE) cairn.hub=$(HUB_URL)" --out $(OUT)/cairn.iso
	$(TOOLS)/cairn-image disk --kernel $(OUT)/bzImage --initramfs $(OUT)/initramfs.cpio.zst \
	  --cmdline "$(MEDIA_CMDLINE)" --out $(OUT)/cairn-cloud.raw --qcow2 $(OUT)/cairn-cloud.qcow2
	scripts/media-report.sh $(OUT)

run: image demo-image
	scripts/run-demo.sh

unit:
	cargo test --workspace --exclude cairn-e2e

e2e: image demo-image
	deb=$$(kernel-config/debian-kernel.sh) || deb=; \
	CAIRN_KERNEL=$(OUT)/bzImage CAIRN_INIT=$(INIT_BIN) CAIRN_HELLO=$(HELLO_BIN) CAIRN_TOOLS=$(TOOLS) \
	CAIRN_DEBIAN_KERNEL=$$deb cargo test -p cairn-e2e -- --nocapture --test-threads=1

# The whole suite: unit + integration + end-to-end; ends with the skip count.
test: image demo-image
	@mkdir -p $(OUT)
	@set -o pipefail; \
	deb=$$(kernel-config/debian-kernel.sh) || deb=; \
	CAIRN_KERNEL=$(OUT)/bzImage CAIRN_INIT=$(INIT_BIN) CAIRN_HELLO=$(HELLO_BIN) CAIRN_TOOLS=$(TOOLS) \
	CAIRN_DEBIAN_KERNEL=$$deb cargo test --workspace -- --nocapture --test-threads=1 2>&1 | tee $(OUT)/test.log; \
	rc=$$?; scripts/test-summary.sh $(OUT)/test.log; exit $$rc

# Boot timeline medians and image sizes (CAIRN_BENCH_RUNS, default 5), and
# DHCP beside busybox udhcpc (CAIRN_BENCH_DHCP_RUNS, default 20).
bench: image demo-image
	CAIRN_KERNEL=$(OUT)/bzImage CAIRN_INIT=$(INIT_BIN) CAIRN_HELLO=$(HELLO_BIN) CAIRN_TOOLS=$(TOOLS) \
	  cargo run -q -p cairn-e2e --bin bench-boot
	CAIRN_KERNEL=$(OUT)/bzImage CAIRN_INIT=$(INIT_BIN) CAIRN_HELLO=$(HELLO_BIN) CAIRN_TOOLS=$(TOOLS) \
	  cargo run -q -p cairn-e2e --bin bench-dhcp
	cargo run -q --release -p cairn-e2e --bin bench-format

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	rm -rf $(OUT)
