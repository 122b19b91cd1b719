//! `flowlens watch`: subscribes to a flowlens agent over gRPC and prints flows as they end, as a table or JSON lines, reconnecting when asked to.

use std::future::Future;
use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::cli::client::{describe, FlowQuery};
use crate::record::api::proto;
use crate::record::flow::FlowRecord;
use crate::record::render::{Format, Renderer, TableStyle};

/// First wait before reconnecting, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub query: FlowQuery,
    /// Print one JSON object per line instead of a table.
    #[arg(long, env = "FLOWLENS_WATCH_JSON")]
    pub json: bool,
    /// Table: every column, unabbreviated (wider than 100 columns).
    #[arg(long, env = "FLOWLENS_WATCH_WIDE")]
    pub wide: bool,
    /// Table: print a legend of the columns and abbreviations before the header.
    #[arg(long, env = "FLOWLENS_WATCH_LEGEND")]
    pub legend: bool,
    /// When the agent goes away (restart, crash), keep trying to reconnect with backoff
    /// instead of exiting; the records a restarted agent kept are replayed.
    #[arg(long, env = "FLOWLENS_WATCH_RECONNECT")]
    pub reconnect: bool,

    /// First print up to N recent matching flows kept by the agent.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        env = "FLOWLENS_WATCH_REPLAY"
    )]
    pub replay: u32,
    /// First print the kept flows last seen within this long ago (e.g. 30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", env = "FLOWLENS_WATCH_SINCE")]
    pub since: Option<String>,
    /// First print the kept flows emitted after record number N (a record's `seq`), to
    /// resume where an earlier watch stopped.
    #[arg(long, value_name = "N", env = "FLOWLENS_WATCH_AFTER_SEQ")]
    pub after_seq: Option<u64>,
    /// Exit after the replay instead of following new flows.
    #[arg(long, env = "FLOWLENS_WATCH_NO_FOLLOW")]
    pub no_follow: bool,
}

/// Subscribes and prints until Ctrl-C (exit 0) or the stream ends; a broken stream is an
/// error unless `--reconnect`.
pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the watch runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered now, before the first output: a Ctrl-C at any point
        // from here on ends the watch cleanly instead of killing it.
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let stop = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        let mut out = io::BufWriter::new(io::stdout().lock());
        watch_to(&args, &mut out, stop).await
    })
}

/// How one subscription ended.
enum Ended {
    /// The server ended the stream (agent stopping, or the replay is over).
    Closed,
    /// The caller's stop signal.
    Stopped,
    /// Output went away (e.g. piped into `head`): a normal way to stop.
    OutputGone,
    /// The connection broke; the message says how.
    Lost(String),
}

/// The body of `run`, with the output and the stop signal supplied by the caller.
pub async fn watch_to(
    args: &WatchArgs,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let req = subscribe_request(args)?;
    let server = &args.query.server;
    let style = TableStyle {
        wide: args.wide,
        legend: args.legend,
    };
    let mut renderer = Renderer::styled(
        if args.json {
            Format::Json
        } else {
            Format::Table
        },
        style,
    );
    tokio::pin!(stop);
    let mut backoff = BACKOFF_FIRST;
    // The start time of the agent we last streamed from, to tell a restart from a blip.
    let mut agent_started: Option<SystemTime> = None;
    let mut reconnecting = false;
    loop {
        let attempt = async {
            let mut client = args.query.connect().await?;
            let started = client
                .get_status(proto::GetStatusRequest {})
                .await
                .ok()
                .and_then(|s| s.into_inner().started)
                .and_then(|t| SystemTime::try_from(t).ok());
            let mut req = req.clone();
            if reconnecting {
                // Only a restarted agent's records are replayed: its ring holds nothing
                // this watch has seen, so all of them (since the epoch).
                let restarted = started.is_some() && started != agent_started;
                req.replay = 0;
                req.since = restarted.then(|| UNIX_EPOCH.into());
                req.follow = Some(true);
            }
            let stream = client
                .subscribe(req)
                .await
                .map_err(|s| {
                    let text = describe(&s);
                    let hint = if crate::cli::client::is_transport_failure(&s) {
                        crate::cli::client::transport_hint(
                            &crate::cli::client::server_uri(server),
                            &text,
                        )
                    } else {
                        ""
                    };
                    anyhow::anyhow!("subscribing at {server}: {text}{hint}")
                })?
                .into_inner();
            anyhow::Ok((stream, started))
        };
        let connected = tokio::select! {
            _ = &mut stop => return Ok(()),
            c = attempt => c,
        };
        let (stream, started) = match connected {
            Ok(c) => c,
            Err(e) if reconnecting => {
                eprintln!("flowlens watch: {e:#}; retrying in {backoff:?}");
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(e) => return Err(e),
        };
        if reconnecting {
            let restarted = started.is_some() && started != agent_started;
            eprintln!(
                "flowlens watch: reconnected to {server}{}",
                if restarted {
                    "; the agent had restarted: replaying the records it kept"
                } else {
                    "; records ended while disconnected were missed"
                }
            );
        }
        agent_started = started;
        if let Err(e) = renderer.header(out).and_then(|()| out.flush()) {
            return quiet_pipe(e);
        }
        let began = Instant::now();
        match follow(stream, &mut renderer, out, &mut stop).await {
            Ended::Stopped | Ended::OutputGone => return Ok(()),
            Ended::Closed if !args.reconnect || req.follow == Some(false) => {
                if req.follow != Some(false) {
                    eprintln!("flowlens watch: the server ended the stream");
                }
                return Ok(());
            }
            Ended::Lost(why) if !args.reconnect => {
                bail!("stream from {server} lost: {why}")
            }
            Ended::Closed => {
                eprintln!(
                    "flowlens watch: {server} ended the stream (agent stopping?); reconnecting"
                )
            }
            Ended::Lost(why) => {
                eprintln!("flowlens watch: stream from {server} lost ({why}); reconnecting")
            }
        }
        // A stream that ended soon after it began waits out the backoff like a failed
        // connect: a server that ends every stream at once must not make a busy loop of it.
        if began.elapsed() < BACKOFF_MAX {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            backoff = BACKOFF_FIRST;
        }
        reconnecting = true;
    }
}

/// Prints one subscription's records until it ends.
async fn follow(
    mut stream: tonic::Streaming<proto::SubscribeResponse>,
    renderer: &mut Renderer,
    out: &mut impl Write,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Ended {
    loop {
        let msg = tokio::select! {
            _ = stop.as_mut() => return Ended::Stopped,
            msg = stream.message() => msg,
        };
        let event = match msg {
            Ok(Some(m)) => m.event,
            Ok(None) => return Ended::Closed,
            Err(s) => return Ended::Lost(describe(&s)),
        };
        match event {
            Some(proto::subscribe_response::Event::Flows(batch)) => {
                if let Err(e) = print_batch(&batch, renderer, out) {
                    return match quiet_pipe(e) {
                        Ok(()) => Ended::OutputGone,
                        Err(e) => Ended::Lost(format!("{e:#}")),
                    };
                }
            }
            Some(proto::subscribe_response::Event::Lost(lost)) => {
                eprintln!(
                    "flowlens watch: LOST {} flow records ({})",
                    lost.count,
                    match lost.reason() {
                        proto::LostReason::QueueFull =>
                            "queue full: this client did not read fast enough",
                        proto::LostReason::Unspecified => "unspecified reason",
                    }
                );
            }
            None => {}
        }
    }
}

/// Output going away (e.g. piped into `head`) is a normal way to stop.
fn quiet_pipe(e: io::Error) -> anyhow::Result<()> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e).context("writing to stdout")
    }
}

fn print_batch(
    batch: &proto::FlowBatch,
    renderer: &mut Renderer,
    out: &mut impl Write,
) -> io::Result<()> {
    for p in &batch.records {
        let rec = match FlowRecord::try_from(p) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("flowlens watch: skipping malformed record: {e}");
                continue;
            }
        };
        renderer.record(out, &rec)?;
    }
    out.flush()
}

/// Builds the Subscribe request the flags describe, rejecting bad values by flag name.
pub fn subscribe_request(a: &WatchArgs) -> anyhow::Result<proto::SubscribeRequest> {
    let (include, exclude) = a.query.filters()?;
    let since = a
        .since
        .as_deref()
        .map(|s| -> anyhow::Result<prost_types::Timestamp> {
            let ago = humantime::parse_duration(s).with_context(|| {
                format!("--since {s:?}: expected a duration such as 90s, 5m, 1h30m")
            })?;
            let t = SystemTime::now()
                .checked_sub(ago)
                .unwrap_or(UNIX_EPOCH)
                .max(UNIX_EPOCH);
            Ok(t.into())
        })
        .transpose()?;
    Ok(proto::SubscribeRequest {
        include,
        exclude,
        replay: a.replay,
        since,
        follow: Some(!a.no_follow),
        after_seq: a.after_seq,
    })
}
