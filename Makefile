# flowlens: `make run` starts the collector, `make test` runs every test (as root).

CARGO ?= cargo
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
PREFIX ?= /usr/local
# What the build and `make run` need; `deps` installs the missing ones. libssl-dev: librdkafka
# (built from the rdkafka crate's sources) links OpenSSL for Kafka TLS and SASL SCRAM.
APT_PACKAGES := clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config protobuf-compiler \
	make gcc iproute2 libssl-dev
# What the tests and the benchmarks add (`test-deps`): traffic and captures in the tests'
# namespaces, the IPFIX collectors, a terminal for `top`, jq for the shell pipes the
# README shows, systemd-analyze and setpriv for the unit, bpftool for `make vmlinux`;
# libprotobuf-dev (the protobuf well-known types ClickHouse needs beside flowlens.proto) and
# python3-venv for the Kafka and ClickHouse tests.
TEST_APT_PACKAGES := iputils-ping ethtool iperf3 hping3 tshark nfdump pmacct tmux \
	jq systemd util-linux bpftool libprotobuf-dev python3-venv
RUN_ARGS ?=

# --- Test tools for the Kafka and ClickHouse tests (tests/kafka.rs), kept in a cache outside
# the tree so a machine builds them once; `kafka-test-tools` makes what is missing.
TOOLS_DIR ?= $(HOME)/.cache/flowlens-tools
# tansu, a Kafka-protocol broker, from crates.io: about 11 minutes to build on 2 vCPUs.
TANSU_VERSION := 0.6.0
TANSU := $(TOOLS_DIR)/tansu/bin/tansu
# chdb, the ClickHouse engine in-process (26.x), in a venv of its own.
CHDB_VERSION := 4.4.0
TEST_PYTHON := $(TOOLS_DIR)/py/bin/python
CHDB_STAMP := $(TOOLS_DIR)/py/.chdb-$(CHDB_VERSION)

.PHONY: deps test-deps test-apt kafka-test-tools build run test bench lint vmlinux install clean

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

test-deps: deps test-apt kafka-test-tools

test-apt:
	$(call apt_install,$(TEST_APT_PACKAGES))

kafka-test-tools: $(TANSU) $(CHDB_STAMP)

$(TANSU):
	$(CARGO) install tansu --version $(TANSU_VERSION) --locked --features dynostore \
		--root $(TOOLS_DIR)/tansu

# After the apt packages: python3-venv makes `python3 -m venv` work with Debian's python3.
$(CHDB_STAMP): | test-apt
	python3 -m venv $(TOOLS_DIR)/py
	$(TEST_PYTHON) -m pip install -q --disable-pip-version-check chdb==$(CHDB_VERSION)
	touch $@

build: deps
	$(CARGO) build --release --bins

run: build
	./target/release/flowlens run $(RUN_ARGS)

test: test-deps
	$(CARGO) build --tests --bins
	FLOWLENS_TOOLS_DIR=$(TOOLS_DIR) $(CARGO) test --no-fail-fast -- --test-threads=2

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
