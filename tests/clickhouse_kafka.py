"""ClickHouse (chdb, in-process) reads a flowlens topic with the DDL of deploy/clickhouse.

Run by tests/kafka.rs with the test-deps Python. Creates the named collection from
kafka_connection.sql with this broker, topic and group put in, runs flowlens.sql verbatim,
waits for --expect rows in flowlens.flows, and prints one JSON object: the sums per flow and
direction, the row and distinct seq counts, the parse errors, and the rows of each example
query in queries.sql (run verbatim).
"""

import argparse
import json
import os
import re
import sys
import time

from chdb import session


def statements(sql):
    """The statements of a file: comment lines dropped, split at ';' ending a line."""
    lines = [l for l in sql.splitlines() if not l.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";").strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--deploy", required=True, help="deploy/clickhouse")
    ap.add_argument("--schemas", required=True, help="flowlens.proto and google/protobuf/")
    ap.add_argument("--data", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()

    # clickhouse-local (and so chdb) looks for format schemas in the working directory.
    os.chdir(a.schemas)
    s = session.Session(a.data)

    def q(sql, fmt="JSONEachRow"):
        out = str(s.query(sql, fmt)).strip()
        return [json.loads(l) for l in out.splitlines() if l.strip()]

    conn = open(os.path.join(a.deploy, "kafka_connection.sql")).read()
    for key, value in (
        ("kafka_broker_list", a.brokers),
        ("kafka_topic_list", a.topic),
        ("kafka_group_name", a.group),
    ):
        conn, n = re.subn(key + r"\s*=\s*'[^']*'", f"{key} = '{value}'", conn)
        assert n == 1, f"{key} not found once in kafka_connection.sql"
    for st in statements(conn):
        s.query(st)

    for st in statements(open(os.path.join(a.deploy, "flowlens.sql")).read()):
        try:
            s.query(st)
        except Exception as e:  # noqa: BLE001
            # chdb 26.x: creating a Kafka table raises this although the table works.
            if "ENGINE = Kafka" in st and "Shutdown was called" in str(e):
                continue
            raise
    tables = {r["name"] for r in q("SELECT name FROM system.tables WHERE database = 'flowlens'")}
    assert {"kafka_flows", "flows", "flows_mv", "kafka_errors", "kafka_errors_mv"} <= tables, tables

    deadline = time.time() + a.timeout
    rows = 0
    while time.time() < deadline:
        rows = q("SELECT count() AS n FROM flowlens.flows")[0]["n"]
        if int(rows) >= a.expect:
            break
        time.sleep(0.5)
    # Anything more than expected would show up within a flush interval.
    time.sleep(1)

    def addr(v):
        return v[7:] if v.startswith("::ffff:") and "." in v else v

    flows = q(
        "SELECT toString(client_addr) AS c, toString(server_addr) AS s, client_port AS cp, "
        "server_port AS sp, protocol AS p, sum(client_packets) AS c_pk, sum(client_bytes) AS c_b, "
        "sum(server_packets) AS s_pk, sum(server_bytes) AS s_b FROM flowlens.flows "
        "GROUP BY c, s, cp, sp, p"
    )
    for f in flows:
        f["c"], f["s"] = addr(f["c"]), addr(f["s"])
    # Who owned each side's local socket, as the rows say: one row per flow and owners.
    owners = q(
        "SELECT DISTINCT toString(client_addr) AS c, toString(server_addr) AS s, "
        "client_port AS cp, server_port AS sp, protocol AS p, "
        + ", ".join(
            f"{side}_process_{f} AS {side[0]}_{f}"
            for side in ("client", "server")
            for f in ("cgroup_id", "cgroup", "unit", "pid", "comm", "uid")
        )
        + " FROM flowlens.flows"
    )
    for o in owners:
        o["c"], o["s"] = addr(o["c"]), addr(o["s"])
    counts = q("SELECT count() AS rows, uniqExact(seq) AS seqs FROM flowlens.flows")[0]
    errors = q("SELECT count() AS n FROM flowlens.kafka_errors")[0]["n"]
    queries = [
        q(st) for st in statements(open(os.path.join(a.deploy, "queries.sql")).read())
    ]
    for rows_ in queries:
        for r in rows_:
            for k in ("client_addr", "server_addr"):
                if k in r:
                    r[k] = addr(r[k])
    json.dump(
        {
            "rows": int(counts["rows"]),
            "seqs": int(counts["seqs"]),
            "errors": int(errors),
            "flows": flows,
            "owners": owners,
            "queries": queries,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
