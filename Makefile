# flowlens: `make run` starts the collector, `make test` runs every test (as root).

CARGO ?= cargo
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
PREFIX ?= /usr/local
# Packages the build, the tests and the benchmarks need; `deps` installs the missing ones.
# libssl-dev: librdkafka (built from the rdkafka crate's sources) links OpenSSL for Kafka TLS
# and SASL SCRAM.
APT_PACKAGES := clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config protobuf-compiler \
	iproute2 iputils-ping bpftool ethtool iperf3 hping3 make gcc nfdump pmacct tshark tmux \
	libssl-dev
RUN_ARGS ?=

# --- Test tools for the Kafka and ClickHouse tests (tests/kafka.rs), kept in a cache outside
# the tree so a machine builds them once; `kafka-test-tools` installs what is missing and is a
# prerequisite of `test-deps` (the test side of the dependencies).
TOOLS_DIR ?= $(HOME)/.cache/flowlens-tools
# tansu, a Kafka-protocol broker, from crates.io: about 11 minutes to build on 2 vCPUs.
TANSU_VERSION := 0.6.0
TANSU := $(TOOLS_DIR)/tansu/bin/tansu
# chdb, the ClickHouse engine in-process (26.x), in a venv of its own.
CHDB_VERSION := 4.4.0
TEST_PYTHON := $(TOOLS_DIR)/py/bin/python
CHDB_STAMP := $(TOOLS_DIR)/py/.chdb-$(CHDB_VERSION)
# libprotobuf-dev: the protobuf well-known types ClickHouse needs beside flowlens.proto.
KAFKA_TEST_APT_PACKAGES := libprotobuf-dev python3-venv

.PHONY: deps test-deps kafka-test-tools kafka-test-apt build run test bench lint vmlinux install clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true

# What the tests need beyond `deps`.
test-deps: deps kafka-test-tools

kafka-test-tools: kafka-test-apt $(TANSU) $(CHDB_STAMP)

kafka-test-apt:
	@missing=""; for p in $(KAFKA_TEST_APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(TANSU):
	$(CARGO) install tansu --version $(TANSU_VERSION) --locked --features dynostore \
		--root $(TOOLS_DIR)/tansu

# After the apt packages: python3-venv makes `python3 -m venv` work with Debian's python3.
$(CHDB_STAMP): | kafka-test-apt
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
