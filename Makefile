# flowlens: `make run` starts the collector, `make test` runs every test (as root).

CARGO ?= cargo
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
PREFIX ?= /usr/local
# What the build and `make run` need; `deps` installs the missing ones.
APT_PACKAGES := clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config protobuf-compiler \
	make gcc iproute2
# What the tests and the benchmarks add (`test-deps`): traffic and captures in the tests'
# namespaces, the IPFIX collectors, a terminal for `top`, jq for the shell pipes the
# README shows, systemd-analyze and setpriv for the unit, bpftool for `make vmlinux`.
TEST_APT_PACKAGES := iputils-ping ethtool iperf3 hping3 tshark nfdump pmacct tmux \
	jq systemd util-linux bpftool
# The Kafka broker the Kafka sink's tests start (tansu) is built here, in `test-deps`.
RUN_ARGS ?=

.PHONY: deps test-deps build run test bench lint vmlinux install clean

# Installs the Debian packages of $(1) that are missing.
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

deps:
	$(call apt_install,$(APT_PACKAGES))
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true

test-deps: deps
	$(call apt_install,$(TEST_APT_PACKAGES))

build: deps
	$(CARGO) build --release --bins

run: build
	./target/release/flowlens run $(RUN_ARGS)

test: test-deps
	$(CARGO) build --tests --bins
	$(CARGO) test --no-fail-fast -- --test-threads=2

bench: test-deps
	$(CARGO) build --release --bins
	./target/release/flowlens-bench

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

vmlinux: test-deps
	mkdir -p vmlinux/$(ARCH)
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux/$(ARCH)/vmlinux.h

install: build
	install -D -m 0755 target/release/flowlens $(DESTDIR)$(PREFIX)/bin/flowlens
	install -D -m 0644 deploy/flowlens.service $(DESTDIR)/etc/systemd/system/flowlens.service
	test -e $(DESTDIR)/etc/default/flowlens || install -D -m 0644 deploy/flowlens.env $(DESTDIR)/etc/default/flowlens

clean:
	$(CARGO) clean
