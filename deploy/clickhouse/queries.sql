-- Example questions for flowlens.flows (flowlens.sql).

-- Top talkers over the last hour: the 10 client -> server pairs that moved the most bytes
-- (both directions), across every host that reported them.
SELECT
    client_addr,
    server_addr,
    server_port,
    protocol,
    sum(client_bytes) AS bytes_sent,
    sum(server_bytes) AS bytes_received,
    sum(client_bytes + server_bytes) AS bytes,
    sum(client_packets + server_packets) AS packets,
    uniqExact(observer) AS observers
FROM flowlens.flows
WHERE time >= now() - INTERVAL 1 HOUR
GROUP BY client_addr, server_addr, server_port, protocol
ORDER BY bytes DESC
LIMIT 10;

-- p95 TCP handshake time (SYN -> SYN-ACK -> ACK, as each host saw it) per server over the
-- last hour, in milliseconds.
SELECT
    server_addr,
    server_port,
    count() AS handshakes,
    round(quantile(0.95)(tcp_handshake_client_ns + tcp_handshake_server_ns) / 1e6, 3) AS p95_ms,
    round(avg(tcp_handshake_client_ns + tcp_handshake_server_ns) / 1e6, 3) AS mean_ms
FROM flowlens.flows
WHERE time >= now() - INTERVAL 1 HOUR
  AND protocol = 6
  AND tcp_handshake_client_ns IS NOT NULL
  AND tcp_handshake_server_ns IS NOT NULL
GROUP BY server_addr, server_port
ORDER BY p95_ms DESC
LIMIT 20;

-- Which services moved the most over the last hour: bytes per systemd unit of the local
-- socket each flow ends at (a flow between two local services counts for both).
SELECT
    unit,
    sum(client_bytes + server_bytes) AS bytes,
    count() AS records,
    uniqExact(flow_id) AS flows
FROM flowlens.flows
ARRAY JOIN arrayDistinct(arrayFilter(u -> u != '', [client_process_unit, server_process_unit])) AS unit
WHERE time >= now() - INTERVAL 1 HOUR
GROUP BY unit
ORDER BY bytes DESC
LIMIT 10;
