-- flowlens -> Kafka -> ClickHouse: the tables. Run as is (clickhouse-client --multiquery <
-- flowlens.sql) once the named collection flowlens_kafka exists (kafka_connection.sql) and
-- proto/flowlens/v1/flowlens.proto is in the server's format_schema_path as flowlens.proto.
--
-- flowlens.kafka_flows reads the topic: one flowlens.v1.FlowRecord per message
-- (ProtobufSingle: not length-delimited). Its columns take the proto's field names, nested
-- fields joined with '_' (client_packets is client.packets), so ClickHouse matches them by
-- name; fields it does not list are skipped. flowlens.flows_mv moves each block it reads into
-- flowlens.flows, the table to query. A message that does not parse stops nothing: it goes
-- to flowlens.kafka_errors (kafka_handle_error_mode = 'stream'), where it can be counted.

CREATE DATABASE IF NOT EXISTS flowlens;

CREATE TABLE IF NOT EXISTS flowlens.kafka_flows
(
    seq UInt64,
    flow_id UInt64,
    observer String,
    ip_version UInt8,
    protocol UInt8,
    client_addr String,
    client_port UInt16,
    server_addr String,
    server_port UInt16,
    ifindex UInt32,
    interface String,
    first_hook String,
    first_seen_seconds Int64,
    first_seen_nanos Int32,
    last_seen_seconds Int64,
    last_seen_nanos Int32,
    window_start_seconds Int64,
    window_start_nanos Int32,
    client_packets UInt64,
    client_bytes UInt64,
    client_ttl UInt8,
    server_packets UInt64,
    server_bytes UInt64,
    server_ttl UInt8,
    end_reason String,
    continuation Bool,
    fragment Bool,
    tcp_client_flags UInt8,
    tcp_server_flags UInt8,
    tcp_state String,
    tcp_handshake_client_ns Nullable(UInt32),
    tcp_handshake_server_ns Nullable(UInt32),
    tcp_syn_retransmits UInt32,
    tcp_late_start Bool,
    tcp_client_latency_count UInt32,
    tcp_client_latency_sum_ns UInt64,
    tcp_client_latency_min_ns UInt32,
    tcp_client_latency_max_ns UInt32,
    tcp_client_latency_jitter_ns Nullable(UInt64),
    tcp_server_latency_count UInt32,
    tcp_server_latency_sum_ns UInt64,
    tcp_server_latency_min_ns UInt32,
    tcp_server_latency_max_ns UInt32,
    tcp_server_latency_jitter_ns Nullable(UInt64),
    icmp_client_type Nullable(UInt8),
    icmp_client_code Nullable(UInt8),
    icmp_server_type Nullable(UInt8),
    icmp_server_code Nullable(UInt8),
    icmp_echo_id Nullable(UInt16),
    icmp_echo_rtt_count UInt32,
    icmp_echo_rtt_sum_ns UInt64,
    icmp_echo_rtt_min_ns UInt32,
    icmp_echo_rtt_max_ns UInt32,
    client_process_cgroup_id Nullable(UInt64),
    client_process_cgroup String,
    client_process_unit String,
    client_process_pid Nullable(UInt32),
    client_process_comm String,
    client_process_uid Nullable(UInt32),
    server_process_cgroup_id Nullable(UInt64),
    server_process_cgroup String,
    server_process_unit String,
    server_process_pid Nullable(UInt32),
    server_process_comm String,
    server_process_uid Nullable(UInt32)
)
ENGINE = Kafka(flowlens_kafka)
SETTINGS kafka_format = 'ProtobufSingle',
         kafka_schema = 'flowlens.proto:FlowRecord',
         kafka_num_consumers = 1,
         kafka_handle_error_mode = 'stream';

-- One row per flow record. Packets and bytes are deltas over [window_start, last_seen]:
-- sum them. Addresses are IPv6 (IPv4 as ::ffff:a.b.c.d; compare with '10.0.0.1' as is).
-- Durations in ns; a latency's mean is sum_ns / count.
CREATE TABLE IF NOT EXISTS flowlens.flows
(
    time DateTime64(9, 'UTC') COMMENT 'last_seen: the latest packet of the record''s window',
    first_seen DateTime64(9, 'UTC'),
    window_start DateTime64(9, 'UTC'),
    observer LowCardinality(String),
    flow_id UInt64,
    seq UInt64,
    ip_version UInt8,
    protocol UInt8,
    client_addr IPv6,
    client_port UInt16,
    server_addr IPv6,
    server_port UInt16,
    interface LowCardinality(String),
    ifindex UInt32,
    first_hook LowCardinality(String),
    client_packets UInt64,
    client_bytes UInt64,
    client_ttl UInt8,
    server_packets UInt64,
    server_bytes UInt64,
    server_ttl UInt8,
    end_reason LowCardinality(String),
    continuation Bool,
    fragment Bool,
    tcp_client_flags UInt8,
    tcp_server_flags UInt8,
    tcp_state LowCardinality(String),
    tcp_handshake_client_ns Nullable(UInt32) COMMENT 'SYN -> SYN-ACK',
    tcp_handshake_server_ns Nullable(UInt32) COMMENT 'SYN-ACK -> ACK',
    tcp_syn_retransmits UInt32,
    tcp_late_start Bool,
    tcp_client_latency_count UInt32,
    tcp_client_latency_sum_ns UInt64,
    tcp_client_latency_min_ns UInt32,
    tcp_client_latency_max_ns UInt32,
    tcp_client_latency_jitter_ns Nullable(UInt64),
    tcp_server_latency_count UInt32,
    tcp_server_latency_sum_ns UInt64,
    tcp_server_latency_min_ns UInt32,
    tcp_server_latency_max_ns UInt32,
    tcp_server_latency_jitter_ns Nullable(UInt64),
    icmp_client_type Nullable(UInt8),
    icmp_client_code Nullable(UInt8),
    icmp_server_type Nullable(UInt8),
    icmp_server_code Nullable(UInt8),
    icmp_echo_id Nullable(UInt16),
    icmp_echo_rtt_count UInt32,
    icmp_echo_rtt_sum_ns UInt64,
    icmp_echo_rtt_min_ns UInt32,
    icmp_echo_rtt_max_ns UInt32,
    -- The local socket each side is and who owns it (README "Which service owns a flow"):
    -- empty strings and NULLs for a side that is not a socket of the reporting host.
    client_process_cgroup_id Nullable(UInt64),
    client_process_cgroup LowCardinality(String),
    client_process_unit LowCardinality(String) COMMENT 'systemd unit, e.g. nginx.service',
    client_process_pid Nullable(UInt32),
    client_process_comm LowCardinality(String),
    client_process_uid Nullable(UInt32),
    server_process_cgroup_id Nullable(UInt64),
    server_process_cgroup LowCardinality(String),
    server_process_unit LowCardinality(String),
    server_process_pid Nullable(UInt32),
    server_process_comm LowCardinality(String),
    server_process_uid Nullable(UInt32)
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (toStartOfHour(time), observer, server_addr, server_port, time)
-- Keep 30 days; change or drop to taste.
TTL toDateTime(time) + INTERVAL 30 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS flowlens.flows_mv TO flowlens.flows AS
SELECT
    fromUnixTimestamp64Nano(last_seen_seconds * 1000000000 + last_seen_nanos, 'UTC') AS time,
    fromUnixTimestamp64Nano(first_seen_seconds * 1000000000 + first_seen_nanos, 'UTC') AS first_seen,
    fromUnixTimestamp64Nano(window_start_seconds * 1000000000 + window_start_nanos, 'UTC') AS window_start,
    observer,
    flow_id,
    seq,
    ip_version,
    protocol,
    toIPv6(client_addr) AS client_addr,
    client_port,
    toIPv6(server_addr) AS server_addr,
    server_port,
    interface,
    ifindex,
    lower(replaceOne(first_hook, 'HOOK_', '')) AS first_hook,
    client_packets,
    client_bytes,
    client_ttl,
    server_packets,
    server_bytes,
    server_ttl,
    lower(replaceOne(end_reason, 'END_REASON_', '')) AS end_reason,
    continuation,
    fragment,
    tcp_client_flags,
    tcp_server_flags,
    lower(replaceOne(tcp_state, 'TCP_STATE_', '')) AS tcp_state,
    tcp_handshake_client_ns,
    tcp_handshake_server_ns,
    tcp_syn_retransmits,
    tcp_late_start,
    tcp_client_latency_count,
    tcp_client_latency_sum_ns,
    tcp_client_latency_min_ns,
    tcp_client_latency_max_ns,
    tcp_client_latency_jitter_ns,
    tcp_server_latency_count,
    tcp_server_latency_sum_ns,
    tcp_server_latency_min_ns,
    tcp_server_latency_max_ns,
    tcp_server_latency_jitter_ns,
    icmp_client_type,
    icmp_client_code,
    icmp_server_type,
    icmp_server_code,
    icmp_echo_id,
    icmp_echo_rtt_count,
    icmp_echo_rtt_sum_ns,
    icmp_echo_rtt_min_ns,
    icmp_echo_rtt_max_ns,
    client_process_cgroup_id,
    client_process_cgroup,
    client_process_unit,
    client_process_pid,
    client_process_comm,
    client_process_uid,
    server_process_cgroup_id,
    server_process_cgroup,
    server_process_unit,
    server_process_pid,
    server_process_comm,
    server_process_uid
FROM flowlens.kafka_flows
WHERE length(_error) = 0;

-- Messages that did not parse, kept for a week with where they came from.
CREATE TABLE IF NOT EXISTS flowlens.kafka_errors
(
    time DateTime DEFAULT now(),
    topic LowCardinality(String),
    partition UInt64,
    offset UInt64,
    error String,
    raw_message String
)
ENGINE = MergeTree
ORDER BY time
TTL time + INTERVAL 7 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS flowlens.kafka_errors_mv TO flowlens.kafka_errors AS
SELECT _topic AS topic, _partition AS partition, _offset AS offset, _error AS error,
       _raw_message AS raw_message
FROM flowlens.kafka_flows
WHERE length(_error) > 0;
