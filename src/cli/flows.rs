//! `flowlens flows`: the agent's flows in progress (ListFlows), once, sorted, as a table or a JSON array; at home on a pipe as much as on a terminal.

use std::io::{self, Write};

use anyhow::Context;

use crate::cli::client::{describe, list_flows, FlowQuery};
use crate::cli::watch::TableArgs;
use crate::record::api::proto;
use crate::record::encoding::Stamp;
use crate::record::flow::FlowRecord;
use crate::record::render::{self, Format, JsonRecord, Renderer, TableKind};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub query: FlowQuery,
    /// Print one JSON array of records (the fields of `watch --json`; counters cumulative
    /// since each flow's first packet, `emitted` the snapshot's time) instead of a table.
    #[arg(long, env = "FLOWLENS_FLOWS_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub table: TableArgs,
    /// Order, largest (oldest) first.
    #[arg(long, value_enum, env = "FLOWLENS_FLOWS_SORT", default_value_t = FlowsSort::Bytes)]
    pub sort: FlowsSort,
    /// Smallest (youngest) first.
    #[arg(long, env = "FLOWLENS_FLOWS_REVERSE")]
    pub reverse: bool,
    /// At most N flows (the first N of the order).
    #[arg(long, value_name = "N", env = "FLOWLENS_FLOWS_LIMIT")]
    pub limit: Option<usize>,
}

/// What `flows` sorts by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowsSort {
    /// Bytes both ways since the first packet.
    #[default]
    Bytes,
    /// Packets both ways since the first packet.
    Packets,
    /// Time since the first packet.
    Age,
    /// Server response time (mean), else the handshake or echo round trip.
    Latency,
}

/// Flows asked for per page.
const PAGE: u32 = 10_000;

/// Lists once and prints.
pub fn run(args: FlowsArgs) -> anyhow::Result<()> {
    let req = proto::ListFlowsRequest {
        page_size: PAGE,
        ..list_request(&args.query)?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let (_, mut flows) = rt.block_on(async {
        let mut client = args.query.agent.connect().await?;
        list_flows(&mut client, &req).await.map_err(|s| {
            anyhow::anyhow!(
                "listing flows at {}: {}",
                args.query.agent.server,
                describe(&s)
            )
        })
    })?;
    sort(&mut flows, args.sort, args.reverse);
    flows.truncate(args.limit.unwrap_or(usize::MAX));
    let mut out = io::BufWriter::new(io::stdout().lock());
    match print(&args, &flows, &mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// The ListFlows request the filter flags describe (flows in progress have no end reason).
pub fn list_request(q: &FlowQuery) -> anyhow::Result<proto::ListFlowsRequest> {
    let (include, exclude) = q.filters(&[])?;
    Ok(proto::ListFlowsRequest {
        include,
        exclude,
        ..Default::default()
    })
}

/// Orders flows by `key`, largest first (unknown latencies last), or the reverse.
pub fn sort(flows: &mut [FlowRecord], key: FlowsSort, reverse: bool) {
    let value = |r: &FlowRecord| -> f64 {
        match key {
            FlowsSort::Bytes => r.total_bytes() as f64,
            FlowsSort::Packets => r.total_packets() as f64,
            FlowsSort::Age => {
                -(r.first_seen
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64())
            }
            FlowsSort::Latency => latency_ns(r).map_or(-1.0, |v| v as f64),
        }
    };
    flows.sort_by(|a, b| {
        let o = value(b).total_cmp(&value(a));
        if reverse {
            o.reverse()
        } else {
            o
        }
    });
}

fn latency_ns(r: &FlowRecord) -> Option<u64> {
    let tcp = r.tcp.as_ref();
    tcp.and_then(|t| t.server_latency.map(|l| l.mean_ns()))
        .or_else(|| tcp.and_then(render::handshake_rtt))
        .or_else(|| r.icmp.and_then(|i| i.echo_rtt).map(|l| l.mean_ns()))
}

/// The table (header, the snapshot's date, a row per flow) or one JSON array.
pub fn print(args: &FlowsArgs, flows: &[FlowRecord], out: &mut impl Write) -> io::Result<()> {
    if args.json {
        writeln!(out, "[")?;
        for (i, r) in flows.iter().enumerate() {
            if i > 0 {
                writeln!(out, ",")?;
            }
            // Flows in progress have no place in the emission order: run and seq 0, as ListFlows says.
            serde_json::to_writer(&mut *out, &JsonRecord::of(Stamp::default(), r))?;
        }
        if !flows.is_empty() {
            writeln!(out)?;
        }
        return writeln!(out, "]");
    }
    let style = render::TableStyle {
        kind: TableKind::InProgress,
        ..args.table.style()
    };
    let mut renderer = Renderer::styled(Format::Table, style);
    renderer.header(out)?;
    for r in flows {
        renderer.record(out, r)?;
    }
    Ok(())
}
