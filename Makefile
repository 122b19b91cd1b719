# flowlens: `make run` starts the collector, `make test` runs every test (as root).

CARGO ?= cargo
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
PREFIX ?= /usr/local
# Packages the build, the tests and the benchmarks need; `deps` installs the missing ones.
APT_PACKAGES := clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config protobuf-compiler \
	iproute2 iputils-ping bpftool ethtool iperf3 hping3 make gcc nfdump pmacct tshark tmux
RUN_ARGS ?=

.PHONY: deps build run test bench lint vmlinux install clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true

build: deps
	$(CARGO) build --release --bins

run: build
	./target/release/flowlens run $(RUN_ARGS)

test: deps
	$(CARGO) build --tests --bins
	$(CARGO) test --no-fail-fast -- --test-threads=2

bench: deps
	$(CARGO) build --release --bins
	./target/release/flowlens-bench

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

vmlinux: deps
	mkdir -p vmlinux/$(ARCH)
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux/$(ARCH)/vmlinux.h

install: build
	install -D -m 0755 target/release/flowlens $(DESTDIR)$(PREFIX)/bin/flowlens
	install -D -m 0644 deploy/flowlens.service $(DESTDIR)/etc/systemd/system/flowlens.service
	test -e $(DESTDIR)/etc/default/flowlens || install -D -m 0644 deploy/flowlens.env $(DESTDIR)/etc/default/flowlens

clean:
	$(CARGO) clean
